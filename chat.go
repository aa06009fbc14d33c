// Chat over WebSocket: a room that everyone in it hears.
//
// The idea fits in the first screens: the hub is the room. A connection
// joins it, says things, may rename itself, and leaves; what one says is
// broadcast to everyone, the sender included. Each client's reader and
// writer come next, then what the frames say. Everything after that is
// machinery, each part under a divider that says why it exists: the
// sessions that outlive a connection, one connection's life, the limits, the
// tuning, and the frame layer. A first reading may stop at any of them.
//
// Who owns what:
//   - The hub owns everything the clients share, under one mutex (hub.mu):
//     who is online, their names, the sessions that may still resume, the
//     message sequence number, the history, and the joins and leaves not
//     yet announced.
//   - A broadcast encodes and frames its message once and, under hub.mu,
//     puts the same bytes in every client's outbox without blocking.
//     Putting under the lock is what keeps every client's view in seq order.
//     A client whose outbox is full is dropped, never waited for, and
//     nothing is written to a socket while hub.mu is held (dropping a
//     client only moves its write deadline). Lock order: hub.mu, then an
//     outbox's own or a wire's deadline lock.
//   - A client has two goroutines. Its reader is the only reader of the
//     socket: it reads frames, decides what each means and calls into the
//     hub. Its writer is the only writer after the handshake: it empties
//     the outbox, the whole backlog in one write, pongs and the close frame
//     included.
package main

import (
	"bufio"
	"bytes"
	"container/list"
	crand "crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// ----------------------------------------------------------------- the room --

// The room's limits. Text lengths are in characters (runes).
const (
	maxTextChars = 2000 // a message's text, after trimming
	historySize  = 50   // recent messages kept, for welcomes and resumes
	welcomeUsers = 100  // users a welcome lists, so it stays small in a large room
)

// hub is the chat room: the http.Handler for GET /ws and everything the
// clients share.
type hub struct {
	log          *slog.Logger
	maxClients   int
	allowOrigins map[string]bool // lower-case "scheme://host[:port]"
	run          string          // this server run; every id carries it, and seq restarts with it
	// The timings of the same names, changeable by tests before serving.
	pingEvery, readIdle, writeWait, resumeWindow, closeGrace time.Duration
	hook                                                     func(c *client, msg []byte) // tests only: runs in the reader before each message

	admitted atomic.Int64   // connections past admission, including mid-handshake
	handlers sync.WaitGroup // one per admitted connection until its goroutines end, for shutdown

	mu       sync.Mutex           // guards the fields below, and every session's fields but id and secret
	clients  map[*client]struct{} // the connections in the room: one per live session
	sessions map[string]*session  // by id: the live sessions, and the ended ones that may resume
	ended    list.List            // the ended sessions, oldest first, at most maxEndedSessions
	byName   map[string]*session  // live sessions by foldName(name), to keep names unique
	bases    map[string]*nameBase // by foldName of a name asked for
	lastID   int64
	seq      int64
	history  [][]byte // encoded messages, oldest first, at most historySize
	histJSON []byte   // history as one JSON array, built on the first join after a change
	joined   map[*session]bool
	left     map[*session]user // with the name it left under
	flushing bool              // a presence flush is scheduled
	pinging  bool              // a round of pings is scheduled
	closed   bool              // shutdown has begun: no joins, no frames
}

func newHub(log *slog.Logger, maxClients int, allowOrigins []string) *hub {
	h := &hub{
		log:          log,
		maxClients:   maxClients,
		allowOrigins: make(map[string]bool),
		run:          strconv.FormatUint(rand.Uint64(), 36),
		pingEvery:    pingEvery,
		readIdle:     readIdle,
		writeWait:    writeWait,
		resumeWindow: resumeWindow,
		closeGrace:   closeGrace,
		clients:      make(map[*client]struct{}),
		sessions:     make(map[string]*session),
		byName:       make(map[string]*session),
		bases:        make(map[string]*nameBase),
		joined:       make(map[*session]bool),
		left:         make(map[*session]user),
	}
	for _, o := range allowOrigins {
		h.allowOrigins[strings.ToLower(strings.TrimSuffix(o, "/"))] = true
	}
	return h
}

// online reports how many people are in the room.
func (h *hub) online() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.clients)
}

// join puts c in the room and queues its welcome, and reports false once
// shutdown has begun. c continues the session req.resume names, if it is
// still kept, or starts a new one. join runs before c's writer starts: the
// welcome is encoded outside the lock, then put in front of what reached c
// meanwhile.
func (h *hub) join(c *client, req joinRequest) bool {
	name, bad := askedName(req.name)
	w, history, ok := h.enter(c, req, name)
	if !ok {
		return false
	}
	first := [][]byte{welcomeFrame(w, history)}
	if bad != nil && !w.Resumed {
		first = append(first, textFrame(encodeRefusal(bad)))
	}
	c.out.putFirst(first...)
	return true
}

// enter is join's part under hub.mu: c speaks for a session from now on,
// and the others hear of it in the next presence frame (unless its session
// never left the room, or left and came back within one). It returns c's
// welcome, and the history that goes with it.
func (h *hub) enter(c *client, req joinRequest, name string) (w welcome, history []byte, ok bool) {
	secret, now := crand.Text(), time.Now() // before the lock: nothing slow under it
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return w, nil, false
	}
	s, resumed := h.sessionLocked(c, req.resume, name, secret, now)
	s.client, c.s = c, s
	h.clients[c] = struct{}{}
	h.schedulePresenceLocked()
	h.schedulePingsLocked()
	w, history = h.welcomeLocked(s, resumed, req.since, now)
	return w, history, true
}

// say broadcasts a message from c, already checked by decodeMessage.
func (h *hub) say(c *client, text string) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.inRoomLocked(c) {
		return
	}
	h.seq++
	msg := encode(message{"message", h.seq, c.s.user(), text, stamp(now)})
	if len(h.history) == historySize {
		copy(h.history, h.history[1:])
		h.history = h.history[:historySize-1]
	}
	h.history = append(h.history, msg)
	h.histJSON = nil
	h.broadcastLocked(msg)
}

// rename changes c's display name and tells everyone.
func (h *hub) rename(c *client, want string) *refusal {
	name, ref := cleanName(want)
	if ref != nil {
		return ref
	}
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	s := c.s
	if !h.inRoomLocked(c) || name == s.name {
		return nil
	}
	old := s.name
	h.releaseNameLocked(s)
	h.takeNameLocked(s, name, name)
	h.broadcastLocked(encode(struct {
		Type string `json:"type"` // "rename"
		User user   `json:"user"`
		Old  string `json:"old"`
		Time string `json:"time"`
	}{"rename", s.user(), old, stamp(now)}))
	return nil
}

// drop takes c out of the room, if it is still there, and has its writer
// close the connection with code: this is how every client leaves.
func (h *hub) drop(c *client, code int, why string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dropLocked(c, code, why)
}

func (h *hub) dropLocked(c *client, code int, why string) {
	if _, ok := h.clients[c]; !ok {
		return
	}
	delete(h.clients, c)
	if s := c.s; s.client == c { // not replaced: the session leaves the room
		h.endLocked(s)
	}
	h.log.Debug("dropping client", "client", c.s.id, "code", code, "reason", why)
	c.out.close(appendClose(nil, code, why), code == closePolicyViolation || code == closeReplaced)
	// A client out of the room gets closeGrace for the writes still to come
	// (its backlog and the close frame) and for the one in progress: a
	// client that stopped reading must not hold its connection, or the
	// server's shutdown, for a whole writeWait.
	c.wire.stopBy(time.Now().Add(h.closeGrace))
}

// broadcastLocked frames payload once and offers the frame to every client.
// The caller holds h.mu.
func (h *hub) broadcastLocked(payload []byte) {
	frame := textFrame(payload)
	for c := range h.clients {
		h.offerLocked(c, frame)
	}
}

// offerLocked queues a frame for c without blocking; if c's outbox is full,
// c is too slow to keep up and is dropped. The caller holds h.mu.
func (h *hub) offerLocked(c *client, frame []byte) {
	if !c.out.put(frame) {
		h.dropLocked(c, closePolicyViolation, "too slow: outbound queue full")
	}
}

// reply queues a frame for c alone: an answer, an error, a pong.
func (h *hub) reply(c *client, frame []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inRoomLocked(c) {
		h.offerLocked(c, frame)
	}
}

// inRoomLocked reports whether c is still in the room (not dropped, and the
// server not shutting down). The caller holds h.mu.
func (h *hub) inRoomLocked(c *client) bool {
	_, ok := h.clients[c]
	return ok && !h.closed
}

// shutdown closes every client with 1001 and refuses new ones. Like every
// dropped client, each then has closeGrace to take what is queued for it.
func (h *hub) shutdown() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for c := range h.clients {
		h.dropLocked(c, closeGoingAway, "server shutting down")
	}
}

// ------------------------------------------------- a client: reader, writer --
//
// Each client in the room has two goroutines on its connection: a reader
// that hands each message it reads to the hub, and a writer that sends what
// the hub put in its outbox. With the room above, this is the whole idea.

// client is one connection to the chat, and the session speaking through it.
type client struct {
	s    *session     // set by join, then fixed
	conn net.Conn     // the hijacked connection; closed by serve (by ServeHTTP, if the handshake fails)
	in   *frameReader // reads conn, and moves its read deadline (the writer pins it: closeAfter); set at the handshake
	wire *wire        // writes conn, and owns its write deadline; set at the handshake

	out        outbox        // frames for the writer: put under hub.mu, but for the welcome and a late client's 1001
	writerDone chan struct{} // closed when the writer goroutine exits
}

func newClient() *client {
	return &client{out: outbox{wake: make(chan struct{}, 1)}, writerDone: make(chan struct{})}
}

// read hands each message c sends to the hub, until the connection closes:
// a close frame from the peer is answered with its own code, a violation of
// RFC 6455 fails the connection with the code nextMessage chose.
func (h *hub) read(c *client) {
	limit := newBucket(rateBurst, ratePerSecond)
	strikes := newBucket(floodStrikes, floodStrikes/floodWindow.Seconds())
	pong := func(p []byte) { h.reply(c, appendFrame(nil, websocket.PongFrame, p)) }
	for {
		// Once c is out of the room this goes on reading (and the hub
		// ignoring) what the peer sends, until its close frame or closeGrace.
		msg, err := c.in.nextMessage(pong)
		var ce *closeError
		if errors.As(err, &ce) {
			h.drop(c, ce.code, ce.reason)
			c.in.linger()
			return
		}
		if err != nil { // the peer went, or stayed silent for readIdle
			h.log.Debug("read ended", "client", c.s.id, "err", err)
			h.drop(c, closeNormal, "")
			return
		}
		if now := time.Now(); !limit.take(now) {
			if !strikes.take(now) {
				h.drop(c, closePolicyViolation, "flooding")
				continue
			}
			h.reply(c, textFrame(encodeRefusal(&refusal{errRateLimited, "too many messages: at most " +
				strconv.Itoa(rateBurst) + " at once or " + strconv.Itoa(ratePerSecond) + " a second"})))
			continue
		}
		if h.hook != nil {
			h.hook(c, msg)
		}
		if ref := h.handle(c, msg); ref != nil {
			h.reply(c, textFrame(encodeRefusal(ref)))
		}
	}
}

// write is c's writer goroutine, the only one that writes to c's
// connection after the handshake: each time it wakes, the whole outbox in
// one write. Once it has written the close frame it gives the peer
// closeGrace to answer (when the server closed first; after the peer's
// close frame the reader has already stopped). A write that fails or blocks
// past writeWait drops c with 1008; the close frame is still tried when the
// failed write sent nothing of its batch, so that the stream is between two
// frames (after half a frame, a close frame would be read as its payload).
// A panic here closes this connection with 1011, written by the recovery
// itself: nothing else would empty the outbox.
func (h *hub) write(c *client) {
	defer close(c.writerDone)
	defer recoverTo(h.log, "chat writer", func() {
		h.drop(c, closeInternalError, "internal error")
		c.wire.Write(appendClose(nil, closeInternalError, "internal error")) // at a frame boundary: a panic is not a write
		c.in.closeAfter(h.closeGrace)
	})
	for range c.out.wake {
		closed, untouched, err := c.writeBatch()
		if err != nil {
			h.drop(c, closePolicyViolation, "too slow: a write failed or blocked") // nothing, once out of the room
			if !closed && untouched {
				continue // the close frame is queued: it may still go, under closeGrace
			}
			c.in.closeAfter(0)
			return
		}
		if closed {
			c.in.closeAfter(h.closeGrace)
			return
		}
	}
}

// writeBatch writes every frame in c's outbox in one write, and reports
// whether the last was the close frame, and, when the write failed, whether
// it wrote nothing of the batch. (It is a function of its own so that the
// writer's stack stays small between wake-ups: inlined, 2 KB more a client.)
func (c *client) writeBatch() (closed, untouched bool, err error) {
	frames, closed := c.out.take()
	bp := batchPool.Get().(*[]byte)
	buf := (*bp)[:0]
	for _, f := range frames {
		buf = append(buf, f...)
	}
	c.out.done(frames)
	n := 0
	if len(buf) > 0 {
		n, err = c.wire.Write(buf) // a close frame goes under the closeGrace dropLocked set
	}
	untouched = n == 0
	if cap(buf) <= maxPooledBatch {
		*bp = buf
		batchPool.Put(bp)
	}
	return closed, untouched, err
}

// ----------------------------------------------------- what is on the wire --
//
// Every frame is a text frame holding one JSON object with a "type": what a
// client's messages ask the hub to do (handle), and what the hub sends.

// user is a session's public identity on the wire.
type user struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

// inbound is any message a client sends; which fields matter depends on Type.
type inbound struct {
	Type string `json:"type"` // "message", "rename" or "ping"
	Text string `json:"text"` // message
	Name string `json:"name"` // rename
}

// message is a chat message as broadcast and kept in history.
type message struct {
	Type string `json:"type"` // "message"
	Seq  int64  `json:"seq"`  // strictly increasing per server run
	From user   `json:"from"`
	Text string `json:"text"`
	Time string `json:"time"`
}

// welcome is the first frame on every connection. Its history goes in
// already encoded (see welcomeFrame).
type welcome struct {
	Type    string `json:"type"` // "welcome"
	You     user   `json:"you"`
	Online  int    `json:"online"`
	Users   []user `json:"users"` // at most welcomeUsers, you first
	Run     string `json:"run"`
	Time    string `json:"time"`
	Resume  string `json:"resume"`  // the token that continues this session; for its owner only
	Resumed bool   `json:"resumed"` // this connection continues a session
	Missed  int64  `json:"missed"`  // messages after the client's since that are no longer kept
}

// refusal is why a client's message was refused; it goes back as an error frame.
type refusal struct {
	Code string `json:"code"`
	Text string `json:"error"`
}

// Error codes carried by {"type":"error"} frames.
const (
	errBadJSON     = "bad_json"
	errUnknownType = "unknown_type"
	errEmpty       = "empty"
	errTooLong     = "too_long"
	errBadName     = "bad_name"
	errRateLimited = "rate_limited"
)

// pongReply answers a client's {"type":"ping"}, framed once for everyone.
var pongReply = textFrame([]byte(`{"type":"pong"}`))

// handle acts on one message from c, or says why it refused it.
func (h *hub) handle(c *client, data []byte) *refusal {
	in, ref := decodeMessage(data)
	if ref != nil {
		return ref
	}
	switch in.Type {
	case "message":
		h.say(c, in.Text)
	case "rename":
		return h.rename(c, in.Name)
	case "ping":
		h.reply(c, pongReply)
	}
	return nil
}

// decodeMessage parses and checks a client's message, valid UTF-8 already
// (see nextMessage). It refuses what is not a JSON object, an unknown type,
// and a text that, trimmed, is empty or over maxTextChars.
func decodeMessage(data []byte) (inbound, *refusal) {
	var in inbound
	if err := json.Unmarshal(data, &in); err != nil {
		return in, &refusal{errBadJSON, "message is not a JSON object of the chat protocol: " + err.Error()}
	}
	switch in.Type {
	case "message":
		in.Text = strings.TrimSpace(in.Text)
		if in.Text == "" {
			return in, &refusal{errEmpty, "message text is empty"}
		}
		if utf8.RuneCountInString(in.Text) > maxTextChars {
			return in, &refusal{errTooLong, "message text is over " + strconv.Itoa(maxTextChars) + " characters"}
		}
	case "rename", "ping":
	default:
		return in, &refusal{errUnknownType, fmt.Sprintf("unknown message type %q: want message, rename or ping", in.Type)}
	}
	return in, nil
}

func encodeRefusal(r *refusal) []byte {
	return encode(struct {
		Type string `json:"type"` // "error"
		*refusal
	}{"error", r})
}

// encode marshals a frame: fixed structs of strings and numbers, which cannot fail.
func encode(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic("chat: encoding frame: " + err.Error())
	}
	return b
}

// stamp formats t as the protocol's times are: RFC 3339, UTC, milliseconds.
func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }

// ------------------------------------------- sessions, names and presence --
//
// Why this exists: a network blip must not cost a person their name or a
// message, names must stay unique in a room of ten thousand, and a connect
// storm must not cost every client a frame per join. A first reading may
// skip it: the room above works without it.

const (
	resumeWindow     = 2 * time.Minute        // how long an ended session may be resumed
	maxEndedSessions = 10_000                 // ended sessions kept for that, oldest forgotten first
	maxNameChars     = 32                     // a display name, after trimming
	presenceEvery    = 250 * time.Millisecond // joins and leaves within it share one presence frame
	presenceNames    = 20                     // names in each presence list; the counts carry the totals
)

// session is one person in the room, across connections: an id, a name and
// a secret resume token. It speaks through one connection at a time, a
// client. When that connection drops, the session waits resumeWindow for
// the page to come back as the same person, with the messages it missed.
type session struct {
	id     string
	secret string // the resume token is id + "." + secret

	name    string        // unique among live sessions
	asked   string        // the name asked for, which suffixes go on
	client  *client       // the connection it speaks through; nil once that ended
	ended   *list.Element // its place in hub.ended, while client is nil
	endedAt time.Time
}

func (s *session) user() user { return user{s.id, s.name} }

// nameBase is what the hub keeps for one name asked for: the next suffix to
// try when it is taken, and how many live sessions asked for it.
type nameBase struct{ next, holders int }

// joinRequest is what GET /ws asks for: ?name=NAME&since=SEQ in the URL, and
// the resume token offered as the subprotocol "resume.TOKEN" (never in the
// URL, which proxies log). Each part is optional.
type joinRequest struct {
	name   string // a display name for a new session
	resume string // a token, to continue a session
	since  int64  // the last seq the client shows, or -1
}

// subprotocol is what pollfree's page asks for, and the only subprotocol
// the server selects; resumePrefix marks the one that carries the token.
const (
	subprotocol  = "pollfree"
	resumePrefix = "resume."
)

// parseJoin reads a join request from the URL's query and the subprotocols
// offered; a since that is not a whole number from 0 up counts as not
// given, and a ?resume= in the URL is ignored.
func parseJoin(q url.Values, protocols []string) joinRequest {
	req := joinRequest{name: q.Get("name"), since: -1}
	if n, err := strconv.ParseInt(q.Get("since"), 10, 64); err == nil && n >= 0 {
		req.since = n
	}
	for _, p := range protocols {
		if token, ok := strings.CutPrefix(p, resumePrefix); ok {
			req.resume = token
		}
	}
	return req
}

// askedName is the name a new session starts with: the one asked for, or a
// random one (with the refusal that says why, when the one asked for was bad).
func askedName(asked string) (string, *refusal) {
	if asked == "" {
		return randomName(), nil
	}
	name, bad := cleanName(asked)
	if bad != nil {
		return randomName(), bad
	}
	return name, nil
}

// sessionLocked returns the session c speaks for, and whether c continues
// it: the one token names if it is still kept, or a new one under name.
// The caller holds h.mu.
func (h *hub) sessionLocked(c *client, token, name, secret string, now time.Time) (s *session, resumed bool) {
	h.forgetEndedLocked(now)
	s = h.resumableLocked(token)
	switch {
	case s == nil:
		h.lastID++
		s = &session{id: h.run + "-" + strconv.FormatInt(h.lastID, 10), secret: secret}
		h.sessions[s.id] = s
		h.takeNameLocked(s, name, name)
		h.joined[s] = true
		return s, false
	case s.client != nil:
		// Its old connection is still open: the server has not noticed it
		// drop, or the page opened another. The session never left the room,
		// so nobody hears of the switch.
		old := s.client
		s.client = c // first, so that dropping old does not end the session
		h.dropLocked(old, closeReplaced, "replaced by a new connection")
	default:
		// Back within resumeWindow, under its old name if that is free.
		h.ended.Remove(s.ended)
		s.ended = nil
		oldName := s.name
		h.takeNameLocked(s, s.name, s.asked)
		if _, ok := h.left[s]; ok && s.name == oldName {
			delete(h.left, s) // left and came back inside one window: in neither list
		} else {
			h.joined[s] = true
		}
	}
	return s, true
}

// welcomeLocked builds s's welcome, and the history that goes with it as a
// JSON array: the messages after since for a resumed session, else the
// whole history. The caller holds h.mu.
func (h *hub) welcomeLocked(s *session, resumed bool, since int64, now time.Time) (welcome, []byte) {
	users := []user{s.user()}
	for other := range h.clients {
		if len(users) == welcomeUsers {
			break
		}
		if other.s != s {
			users = append(users, other.s.user())
		}
	}
	w := welcome{"welcome", s.user(), len(h.clients), users, h.run, stamp(now), s.id + "." + s.secret, resumed, 0}
	if resumed && since >= 0 {
		oldest := h.seq - int64(len(h.history)) + 1 // the seq of h.history[0]
		since = min(since, h.seq)
		from := max(since+1, oldest)
		w.Missed = from - (since + 1)
		return w, jsonArray(h.history[from-oldest:])
	}
	if h.histJSON == nil {
		h.histJSON = jsonArray(h.history)
	}
	return w, h.histJSON // replaced, never changed
}

// welcomeFrame frames w with its history spliced in already encoded: as a
// json.RawMessage it would be validated again, 47 µs a join with a full
// history against 3 µs.
func welcomeFrame(w welcome, history []byte) []byte {
	head := encode(w)
	n := len(head) + len(`,"history":`) + len(history)
	frame := appendHeader(make([]byte, 0, 10+n), websocket.TextFrame, n)
	frame = append(frame, head[:len(head)-1]...) // all but the closing brace
	return append(append(append(frame, `,"history":`...), history...), '}')
}

func jsonArray(frames [][]byte) []byte {
	return append(append([]byte("["), bytes.Join(frames, []byte(","))...), ']')
}

// endLocked takes s out of the room: its leave is announced, its name is
// free, and it waits in h.ended for a resume. The caller holds h.mu.
func (h *hub) endLocked(s *session) {
	if h.joined[s] {
		delete(h.joined, s) // joined and left inside one window: in neither list
	} else if !h.closed {
		h.left[s] = s.user()
		h.schedulePresenceLocked()
	}
	h.releaseNameLocked(s)
	s.client, s.endedAt = nil, time.Now()
	s.ended = h.ended.PushBack(s)
	h.forgetEndedLocked(s.endedAt)
}

// resumableLocked returns the session token continues, or nil (a new session,
// not an error). The secret is compared in constant time, so that how long
// the answer takes tells a guesser nothing. The caller holds h.mu.
func (h *hub) resumableLocked(token string) *session {
	id, secret, ok := strings.Cut(token, ".")
	s := h.sessions[id]
	if !ok || s == nil || subtle.ConstantTimeCompare([]byte(secret), []byte(s.secret)) != 1 {
		return nil
	}
	return s
}

// forgetEndedLocked forgets the sessions that ended more than resumeWindow
// before now, and the oldest past maxEndedSessions. The caller holds h.mu.
func (h *hub) forgetEndedLocked(now time.Time) {
	for e := h.ended.Front(); e != nil; e = h.ended.Front() {
		s := e.Value.(*session)
		if h.ended.Len() <= maxEndedSessions && now.Sub(s.endedAt) <= h.resumeWindow {
			return
		}
		h.ended.Remove(e)
		s.ended = nil
		delete(h.sessions, s.id)
	}
}

// takeNameLocked gives s the name prefer if no live session has it, and
// otherwise asked with the next free "-N" suffix. Each name asked for keeps
// its next suffix, so that the ten-thousandth "ann" is a look-up or two, not
// a scan of ann-2, ann-3... under the lock. The caller holds h.mu.
func (h *hub) takeNameLocked(s *session, prefer, asked string) {
	b := h.bases[foldName(asked)]
	if b == nil {
		b = &nameBase{next: 2}
		h.bases[foldName(asked)] = b
	}
	b.holders++
	name := prefer
	for h.byName[foldName(name)] != nil {
		name = withSuffix(asked, b.next)
		b.next++
	}
	s.name, s.asked = name, asked
	h.byName[foldName(name)] = s
}

// releaseNameLocked frees s's name. The caller holds h.mu.
func (h *hub) releaseNameLocked(s *session) {
	if h.byName[foldName(s.name)] == s {
		delete(h.byName, foldName(s.name))
	}
	if b := h.bases[foldName(s.asked)]; b != nil {
		if b.holders--; b.holders == 0 {
			delete(h.bases, foldName(s.asked))
		}
	}
}

// foldName is the key under which names must be unique: case does not
// tell two users apart.
func foldName(s string) string { return strings.ToLower(s) }

// withSuffix returns name with "-i" on the end, cut to fit maxNameChars.
func withSuffix(name string, i int) string {
	suffix := "-" + strconv.Itoa(i)
	base := []rune(name)
	if max := maxNameChars - len(suffix); len(base) > max {
		base = base[:max]
	}
	return strings.TrimSpace(string(base)) + suffix
}

var (
	nameAdjectives = []string{"amber", "brave", "calm", "clever", "eager", "gentle", "happy", "jolly",
		"keen", "lucky", "merry", "nimble", "quiet", "rapid", "sunny", "witty"}
	nameAnimals = []string{"badger", "crane", "dolphin", "falcon", "gecko", "heron", "koala", "lynx",
		"marmot", "otter", "panda", "quokka", "raven", "seal", "tapir", "wombat"}
)

// randomName picks a readable name for a client that asked for none.
func randomName() string {
	return nameAdjectives[rand.IntN(len(nameAdjectives))] + "-" + nameAnimals[rand.IntN(len(nameAnimals))]
}

// schedulePresenceLocked makes sure a presence flush is on its way. The
// caller holds h.mu.
func (h *hub) schedulePresenceLocked() {
	if !h.flushing {
		h.flushing = true
		time.AfterFunc(presenceEvery, h.flushPresence)
	}
}

// flushPresence broadcasts one presence frame covering every join and leave
// since the last one.
func (h *hub) flushPresence() {
	defer recoverTo(h.log, "presence", nil)
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.flushing = false
	if h.closed || len(h.joined) == 0 && len(h.left) == 0 {
		return
	}
	joined := make([]user, 0, min(len(h.joined), presenceNames))
	for s := range h.joined {
		if len(joined) == presenceNames {
			break
		}
		joined = append(joined, s.user())
	}
	left := make([]user, 0, min(len(h.left), presenceNames))
	for _, u := range h.left {
		if len(left) == presenceNames {
			break
		}
		left = append(left, u)
	}
	frame := encode(struct {
		Type        string `json:"type"` // "presence"
		Online      int    `json:"online"`
		Joined      []user `json:"joined"`
		Left        []user `json:"left"`
		JoinedCount int    `json:"joinedCount"`
		LeftCount   int    `json:"leftCount"`
		Time        string `json:"time"`
	}{"presence", len(h.clients), joined, left, len(h.joined), len(h.left), stamp(now)})
	// New maps, not cleared ones: a storm's entries should not stay allocated.
	h.joined, h.left = make(map[*session]bool), make(map[*session]user)
	h.broadcastLocked(frame)
}

// ---------------------------------------------------- a connection's life --
//
// Why this exists: to turn an HTTP request into a client in the room, and
// to end it cleanly. A first reading may skip it.

// A connection's timing.
const (
	// writeWait bounds each write to a client; a write that takes longer
	// drops the client.
	writeWait = 10 * time.Second
	// The server pings every client each pingEvery (one timer for the room),
	// and a client that sends nothing, not even a pong, for readIdle is gone:
	// a vanished peer is removed within 75 s. pingEvery must be well under readIdle.
	pingEvery = 30 * time.Second
	readIdle  = 75 * time.Second
)

// ServeHTTP handles GET /ws. Every refusal happens before the upgrade, so it
// is a plain HTTP answer: 400 for a request that is not a WebSocket
// handshake (x/net writes it for a malformed one), 403 for a cross-origin
// one, 503 when the room is full. (A handshake that arrives as the server
// stops is answered with close 1001.)
func (h *hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		http.Error(w, "this endpoint speaks WebSocket only", http.StatusBadRequest)
		return
	}
	if err := h.checkOrigin(r); err != nil {
		h.log.Debug("ws refused", "remote", r.RemoteAddr, "err", err)
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	if h.admitted.Add(1) > int64(h.maxClients) {
		h.admitted.Add(-1)
		http.Error(w, "chat is full, try again later", http.StatusServiceUnavailable)
		return
	}
	h.handlers.Add(1) // before the hijack, while Shutdown still waits for this request
	c := newClient()
	var req joinRequest
	// x/net calls Handshake and then Handler on this goroutine, before
	// ServeHTTP returns: req and started need no lock. Until serve owns the
	// connection (a failed handshake, or a panic in join), this gives it up.
	started := false
	defer func() {
		if !started {
			if c.conn != nil {
				c.conn.Close()
			}
			h.admitted.Add(-1)
			h.handlers.Done()
		}
	}()
	ws := websocket.Server{
		// Select "pollfree" when offered, never the token beside it.
		// (x/net reads only the header's first line; a client may send more.)
		Handshake: func(cfg *websocket.Config, r *http.Request) error {
			var offered []string
			for _, line := range r.Header.Values("Sec-WebSocket-Protocol") {
				for p := range strings.SplitSeq(line, ",") {
					offered = append(offered, strings.TrimSpace(p))
				}
			}
			req = parseJoin(r.URL.Query(), offered)
			cfg.Protocol = nil
			if slices.Contains(offered, subprotocol) {
				cfg.Protocol = []string{subprotocol}
			}
			return nil
		},
		// Join, then serve from a goroutine of the connection's own:
		// net/http's goroutine ends, and with it the request's buffers and
		// deep stack, most of what an idle connection would otherwise hold.
		Handler: func(*websocket.Conn) {
			joined := h.join(c, req)
			go h.serve(c, joined)
			started = true
		},
	}
	ws.ServeHTTP(hijacker{w, c, h.readIdle, h.writeWait}, r)
}

// checkOrigin refuses cross-site WebSocket hijacking: a browser always sends
// Origin, and it must name this server (or an allowed origin). A request
// without Origin comes from a non-browser client and is allowed.
func (h *hub) checkOrigin(r *http.Request) error {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return fmt.Errorf("bad Origin %q", origin)
	}
	if strings.EqualFold(u.Host, r.Host) || h.allowOrigins[strings.ToLower(u.Scheme+"://"+u.Host)] {
		return nil
	}
	return fmt.Errorf("origin %s may not open a WebSocket on %s (see -allow-origin)", origin, r.Host)
}

// serve is c's reader goroutine, the only reader of its connection: it
// starts the writer, reads (read, above), and once the connection is
// closing waits for the writer and closes it. joined says whether join let
// c in (not once shutdown has begun). A panic here closes this connection
// with 1011 and no other: the recovery runs first of the deferred calls, so
// the close frame is queued before serve waits for the writer.
func (h *hub) serve(c *client, joined bool) {
	defer h.handlers.Done()
	defer h.admitted.Add(-1)
	defer c.conn.Close()
	defer func() { <-c.writerDone }()
	if !joined { // never in the room, so bounded like a client leaving it
		c.wire.stopBy(time.Now().Add(h.closeGrace))
		c.out.close(appendClose(nil, closeGoingAway, "server shutting down"), true)
	}
	go h.write(c)
	defer recoverTo(h.log, "chat reader", func() { h.drop(c, closeInternalError, "internal error") })
	if joined {
		h.log.Debug("joined", "client", c.s.id, "remote", c.conn.RemoteAddr())
		h.read(c)
	}
}

// schedulePingsLocked makes sure a round of pings is on its way. The caller
// holds h.mu.
func (h *hub) schedulePingsLocked() {
	if !h.pinging {
		h.pinging = true
		time.AfterFunc(h.pingEvery, h.pingAll)
	}
}

// pingAll queues a ping for every client, and schedules the next round while
// anyone is in the room. One timer for the whole hub, rather than a ticker
// per client, keeps an idle connection cheap.
func (h *hub) pingAll() {
	defer recoverTo(h.log, "pings", nil)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pinging = false
	if h.closed || len(h.clients) == 0 {
		return
	}
	h.schedulePingsLocked() // first, so that a panic below stops one round only
	for c := range h.clients {
		h.offerLocked(c, pingFrame)
	}
}

// ------------------------------------------------------------- the limits --
//
// Why this exists: bad input gets an answer and changes nothing else. A
// first reading may skip it.

const (
	// A client may send rateBurst messages at once, refilled at
	// ratePerSecond; more are refused. Refusals have a bucket of their own,
	// floodStrikes refilled over floodWindow (3 a second): one refusal past
	// it closes the client with 1008, so that a flooder let through now and
	// then as the first bucket refills is not forgiven.
	rateBurst     = 10
	ratePerSecond = 5
	floodStrikes  = 30
	floodWindow   = 10 * time.Second
	// A client may send pingBurst pings at once, refilled at pingsPerSecond;
	// one more closes it with 1008. Each ping costs the server a pong.
	pingBurst      = 20
	pingsPerSecond = 10
)

// bucket is a token bucket: it holds up to size tokens, refills at perSecond,
// and take takes one if there is one. A client's reader keeps three: for its
// messages (the rate limit), its refused messages (the flood limit) and its
// pings. Only that reader uses them.
type bucket struct {
	tokens, size, perSecond float64
	last                    time.Time
}

func newBucket(size, perSecond float64) bucket {
	return bucket{tokens: size, size: size, perSecond: perSecond, last: time.Now()}
}

func (b *bucket) take(now time.Time) bool {
	b.tokens = min(b.size, b.tokens+now.Sub(b.last).Seconds()*b.perSecond)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// cleanName returns the display name a client asked for, trimmed and with
// inner white space collapsed, or a refusal. Names may not hold control or
// invisible formatting characters (zero-width, bidi overrides), so a name
// cannot hide text or pass for someone else's by invisible differences.
func cleanName(s string) (string, *refusal) {
	if !utf8.ValidString(s) {
		return "", &refusal{errBadName, "name is not valid UTF-8"}
	}
	s = strings.Join(strings.Fields(s), " ")
	if s == "" {
		return "", &refusal{errBadName, "name is empty"}
	}
	for _, r := range s {
		if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || r == utf8.RuneError {
			return "", &refusal{errBadName, fmt.Sprintf("name holds a control or invisible character (%U)", r)}
		}
	}
	if utf8.RuneCountInString(s) > maxNameChars {
		return "", &refusal{errBadName, "name is over " + strconv.Itoa(maxNameChars) + " characters"}
	}
	return s, nil
}

// ------------------------------------------------------------- the tuning --
//
// Why this exists: memory and CPU at ten thousand clients. The outbox lets
// the hub hand a frame over without waiting, and the batch pool lets an
// idle client hold no buffer. A first reading may skip it.

const (
	// sendQueueFrames bounds a client's outbox; a client whose outbox is full
	// when a frame arrives is dropped. Frames are shared: one costs 24 bytes.
	sendQueueFrames = 256
	maxPooledBatch  = 64 << 10 // the largest batch buffer the pool keeps, in bytes
)

// batchPool holds the writers' batch buffers (up to maxPooledBatch bytes
// each), so that an idle client holds none and a busy one does not allocate.
// With a new buffer per batch and a new queue per take (see outbox.done),
// 5000 clients held 1.9 KB more each.
var batchPool = sync.Pool{New: func() any { return new([]byte) }}

// outbox is a client's queue of frames, framed for the wire, waiting for its
// writer: the hub puts them in one at a time (messages, pings, replies), the
// writer takes all of them at once. A close frame is the last one in.
type outbox struct {
	mu     sync.Mutex // guards the fields below
	frames [][]byte   // at most sendQueueFrames, but for the welcome and a close frame
	spare  [][]byte   // the writer's last batch, emptied, for the next one
	closed bool       // a close frame is queued: nothing more goes in

	wake chan struct{} // one slot: a signal that frames arrived
}

// put queues frame. It reports false when the box is full (or closed).
func (o *outbox) put(frame []byte) bool {
	o.mu.Lock()
	ok := !o.closed && len(o.frames) < sendQueueFrames
	if ok {
		o.frames = append(o.frames, frame)
	}
	o.mu.Unlock()
	o.signal()
	return ok
}

// putFirst queues frames ahead of everything already queued, whatever the
// bound (a new client's welcome, put by join after it let go of hub.mu).
func (o *outbox) putFirst(frames ...[]byte) {
	o.mu.Lock()
	o.frames = append(frames, o.frames...)
	o.mu.Unlock()
	o.signal()
}

// close queues a close frame last, unless one is queued already; discard
// drops the frames queued before it (for a client too slow or hostile to
// deserve them).
func (o *outbox) close(frame []byte, discard bool) {
	o.mu.Lock()
	if !o.closed {
		if discard {
			clear(o.frames)
			o.frames = o.frames[:0]
		}
		o.frames = append(o.frames, frame)
		o.closed = true
	}
	o.mu.Unlock()
	o.signal()
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// take empties the box, and reports whether its last frame was the close
// frame. The writer gives the frames back with done once it has copied them.
func (o *outbox) take() (frames [][]byte, closed bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	frames, o.frames, o.spare = o.frames, o.spare, nil
	return frames, o.closed
}

// done hands a taken batch back to be the next one, so that a busy client's
// queue does not allocate.
func (o *outbox) done(frames [][]byte) {
	clear(frames) // let the frames be collected
	o.mu.Lock()
	o.spare = frames[:0]
	o.mu.Unlock()
}

// -------------------------------------------------------- the frame layer --
//
// Why this exists: RFC 6455 asks a server to check every frame it reads, and
// a text chat must never relay a message that is not whole, valid UTF-8.
// A first reading may skip it.
//
// Which part of the wire is whose:
//   - x/net/websocket checks the opening handshake (net/http has read it:
//     method, upgrade headers, a key, version 13) and writes the 101 answer
//     (through the wire, with the subprotocol ServeHTTP selected). That is all it does: its Conn is never read or
//     written, so it never answers a ping or writes a close frame of its own.
//   - After the handshake, pollfree reads every frame (nextMessage, below:
//     fragments, control frames, UTF-8, close codes) and writes every frame
//     (the client's writer). Server frames are simple: final, unmasked, a
//     two- to ten-byte header.

// Frame-level limits (RFC 6455, section 5).
const (
	maxFrameBytes   = 8 << 10 // a client's message, all its fragments together; more closes with 1009
	maxControlBytes = 125     // a control frame's payload, at most (RFC 6455, section 5.5)
	// The buffers the connection is read and its handshake written through;
	// net/http's 4 KiB pair would be most of an idle client.
	connReadBufferBytes  = 512
	connWriteBufferBytes = 256
)

// WebSocket close codes (RFC 6455, section 7.4.1).
const (
	closeNormal          = 1000
	closeGoingAway       = 1001 // server shutting down
	closeProtocolError   = 1002 // a frame that breaks RFC 6455
	closeUnsupported     = 1003 // a binary frame: the protocol is JSON text
	closeBadData         = 1007 // a text message that is not UTF-8
	closePolicyViolation = 1008 // flooding, or too slow to read
	closeTooBig          = 1009 // a message over maxFrameBytes
	closeInternalError   = 1011 // a panic while serving this connection
	closeReplaced        = 4000 // a resume took over the session (a private-use code)
)

// closeError ends a connection with a close code: the peer's own close
// (echoed), or a reason to fail the connection.
type closeError struct {
	code   int
	reason string
}

func (e *closeError) Error() string { return "close " + strconv.Itoa(e.code) + ": " + e.reason }

func fail(code int, reason string) *closeError { return &closeError{code: code, reason: reason} }

// frameReader reads one client's frames (RFC 6455, section 5.2) from its
// connection. Only the client's reader goroutine calls its methods, but for
// closeAfter, which the writer calls.
type frameReader struct {
	conn net.Conn
	br   *bufio.Reader // conn, after the handshake
	idle time.Duration

	msg   []byte // the data message being put together; nil when none is open
	valid int    // how much of msg is checked UTF-8
	op    byte   // the current frame's opcode
	left  int64  // what is still unread of its payload
	pings bucket

	mu      sync.Mutex // orders the read deadline's moves between nextMessage and closeAfter
	closing bool       // closeAfter has fixed the deadline: nextMessage no longer moves it
}

// header is one frame's header.
type header struct {
	fin, masked bool
	rsv, opcode byte
	length      int64
	key         [4]byte
}

// nextMessage returns the next whole text message. Control frames between
// its fragments, or between messages, are handled here: a ping is answered
// through pong with its payload, a pong only shows the peer is there, a
// close frame ends the connection. It returns a *closeError when the
// connection must close with a code, and otherwise only the connection's
// own errors (the peer went, or sent nothing for idle). A message is judged
// as it arrives: it fails at the first byte that cannot be valid UTF-8.
func (fr *frameReader) nextMessage(pong func(payload []byte)) ([]byte, error) {
	for {
		f, err := fr.header()
		if err != nil {
			return nil, err
		}
		control := f.opcode&0x8 != 0
		switch {
		case !f.masked:
			return nil, fail(closeProtocolError, "client frames must be masked")
		case f.rsv != 0:
			return nil, fail(closeProtocolError, "reserved bits set, and no extension agreed")
		case control && (!f.fin || f.length > maxControlBytes):
			return nil, fail(closeProtocolError, "control frame fragmented or over 125 bytes")
		}
		switch f.opcode {
		case websocket.PingFrame, websocket.PongFrame, websocket.CloseFrame:
			p := make([]byte, f.length)
			if err := fr.payload(p, f.key, false); err != nil {
				return nil, err
			}
			switch {
			case f.opcode == websocket.CloseFrame:
				return nil, peerClose(p)
			case f.opcode == websocket.PongFrame:
			case !fr.pings.take(time.Now()):
				return nil, fail(closePolicyViolation, "ping flood")
			default:
				pong(p)
			}
			continue
		case websocket.TextFrame, websocket.BinaryFrame:
			if fr.msg != nil {
				return nil, fail(closeProtocolError, "a new message inside a fragmented one")
			}
			if f.opcode == websocket.BinaryFrame {
				return nil, fail(closeUnsupported, "text frames only")
			}
		case websocket.ContinuationFrame:
			if fr.msg == nil {
				return nil, fail(closeProtocolError, "a continuation with no message to continue")
			}
		default:
			return nil, fail(closeProtocolError, "reserved opcode "+strconv.Itoa(int(f.opcode)))
		}
		if f.length > maxFrameBytes-int64(len(fr.msg)) { // not a sum: a length near 2^63 would wrap
			return nil, fail(closeTooBig, "message over "+strconv.Itoa(maxFrameBytes)+" bytes")
		}
		if fr.msg == nil {
			fr.msg, fr.valid = make([]byte, 0, f.length), 0
		}
		start := len(fr.msg)
		fr.msg = slices.Grow(fr.msg, int(f.length))[:start+int(f.length)]
		if err := fr.payload(fr.msg[start:], f.key, true); err != nil {
			return nil, err
		}
		if f.fin {
			msg := fr.msg
			fr.msg = nil
			if !fr.checkUTF8(msg, true) {
				return nil, fail(closeBadData, "text message is not valid UTF-8")
			}
			return msg, nil
		}
	}
}

// header reads a frame's header; any frame shows the peer is there, so it
// moves the read deadline idle on.
func (fr *frameReader) header() (f header, err error) {
	var b [2]byte
	for i := range b {
		if b[i], err = fr.br.ReadByte(); err != nil {
			return f, err
		}
	}
	fr.mu.Lock()
	if !fr.closing {
		fr.conn.SetReadDeadline(time.Now().Add(fr.idle))
	}
	fr.mu.Unlock()
	f.fin, f.rsv, f.opcode = b[0]&0x80 != 0, b[0]>>4&0x7, b[0]&0xf
	f.masked, f.length = b[1]&0x80 != 0, int64(b[1]&0x7f)
	extra := 0 // bytes of extended length
	switch f.length {
	case 126:
		extra, f.length = 2, 0
	case 127:
		extra, f.length = 8, 0
	}
	for range extra {
		c, err := fr.br.ReadByte()
		if err != nil {
			return f, err
		}
		f.length = f.length<<8 | int64(c)
	}
	if f.length < 0 { // the top bit of a 64-bit length must be 0
		return f, fail(closeProtocolError, "frame length over 2^63")
	}
	for i := range f.key {
		if !f.masked {
			break
		}
		if f.key[i], err = fr.br.ReadByte(); err != nil {
			return f, err
		}
	}
	fr.op, fr.left = f.opcode, f.length
	return f, nil
}

// payload reads the current frame's payload into p, unmasking it. A text
// fragment (p then ends fr.msg) is checked piece by piece as it arrives.
func (fr *frameReader) payload(p []byte, key [4]byte, text bool) error {
	start := len(fr.msg) - len(p)
	for got := 0; got < len(p); {
		n, err := fr.br.Read(p[got:])
		for i := got; i < got+n; i++ {
			p[i] ^= key[i%4]
		}
		got += n
		fr.left -= int64(n)
		if text && !fr.checkUTF8(fr.msg[:start+got], false) {
			return fail(closeBadData, "text message is not valid UTF-8")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// checkUTF8 checks msg, what has arrived of a text message, from where the
// last check stopped. It must be valid UTF-8, but for a last character cut
// short that more bytes could still complete, unless the message is whole.
func (fr *frameReader) checkUTF8(msg []byte, whole bool) bool {
	rest := msg[fr.valid:]
	if utf8.Valid(rest) {
		fr.valid = len(msg)
		return true
	}
	for len(rest) > 0 {
		r, size := utf8.DecodeRune(rest)
		if r == utf8.RuneError && size == 1 {
			return !whole && !utf8.FullRune(rest) // FullRune is false only for a valid beginning
		}
		rest = rest[size:]
		fr.valid += size
	}
	return true
}

// peerClose is the answer to the peer's close frame: its code echoed (1000
// when it gave none), or a failure when the frame is malformed. Either way
// the peer has said its last.
func peerClose(p []byte) *closeError {
	switch {
	case len(p) == 0:
		return &closeError{closeNormal, ""}
	case len(p) == 1:
		return fail(closeProtocolError, "close frame with a one-byte payload")
	}
	code := int(binary.BigEndian.Uint16(p))
	switch {
	case !validCloseCode(code):
		return fail(closeProtocolError, "close code "+strconv.Itoa(code)+" is not one to send")
	case !utf8.Valid(p[2:]):
		return fail(closeBadData, "close reason is not UTF-8")
	}
	return &closeError{code, ""}
}

// validCloseCode reports whether a close frame may carry code (RFC 6455,
// section 7.4, and the IANA registry: 1012-1014 came later).
func validCloseCode(code int) bool {
	return 1000 <= code && code <= 1003 || 1007 <= code && code <= 1014 || 3000 <= code && code <= 4999
}

// linger reads and drops what the peer still sends once the connection is
// closing, up to its close frame: closed with bytes unread, the connection
// would be reset, and the peer could lose the close frame that says why.
// The writer's closeAfter bounds it.
func (fr *frameReader) linger() {
	for {
		if _, err := fr.br.Discard(int(fr.left)); err != nil || fr.op == websocket.CloseFrame {
			return
		}
		if _, err := fr.header(); err != nil {
			return
		}
	}
}

// closeAfter stops nextMessage moving the read deadline, and gives the peer
// d to finish. The writer calls it once the close frame is out, or cannot go.
func (fr *frameReader) closeAfter(d time.Duration) {
	fr.mu.Lock()
	defer fr.mu.Unlock()
	fr.closing = true
	fr.conn.SetReadDeadline(time.Now().Add(d))
}

// hijacker hands x/net the hijacked connection, with small buffers: x/net
// reads the handshake and writes its answer through the client's wire, and
// the client's frameReader reads the same buffer afterwards.
type hijacker struct {
	http.ResponseWriter
	c         *client
	idle      time.Duration
	writeWait time.Duration
}

func (hj hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(hj.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	var r io.Reader = conn
	if n := brw.Reader.Buffered(); n > 0 { // frames that came with the handshake
		early, _ := brw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(early)), conn)
	}
	conn.SetReadDeadline(time.Now().Add(hj.idle)) // the first; from the first frame on, the frameReader's
	hj.c.attach(conn, r, hj.idle, hj.writeWait)
	// New small buffers, so that net/http's can go with its request.
	return keepOpen{conn}, bufio.NewReadWriter(hj.c.in.br, bufio.NewWriterSize(hj.c.wire, connWriteBufferBytes)), nil
}

// attach makes conn c's connection, read from r (conn, after what came with
// the handshake) and written through a wire.
func (c *client) attach(conn net.Conn, r io.Reader, idle, writeWait time.Duration) {
	c.conn = conn
	c.in = &frameReader{conn: conn, br: bufio.NewReaderSize(r, connReadBufferBytes), idle: idle, pings: newBucket(pingBurst, pingsPerSecond)}
	c.wire = &wire{conn: conn, wait: writeWait}
}

// keepOpen is the connection as x/net sees it: x/net closes it when its
// handler returns, but the client's own goroutines serve on and close it.
type keepOpen struct{ net.Conn }

func (keepOpen) Close() error { return nil }

// wire is the one path by which bytes reach a connection, chat or event
// stream, and the owner of its write deadline: each write sets its own
// deadline as it starts, and mu keeps the pair whole. stopBy is the one
// other hand on it: the hub dropping a client and the broadcaster stopping
// streams end the write in progress, and bound every later one, so that a
// peer that stopped reading cannot hold up shutdown (and a connection
// refused at shutdown gets the same bound for its one write).
type wire struct {
	conn deadlineWriter
	wait time.Duration // how long a write may take

	mu sync.Mutex // held for one write and the deadline set for it

	dmu   sync.Mutex // guards the fields below and every SetWriteDeadline
	set   time.Time  // the deadline in force
	until time.Time  // if not zero, no write may last past it
}

// deadlineWriter is a hijacked connection, or an HTTP/2 stream's response.
type deadlineWriter interface {
	io.Writer
	SetWriteDeadline(time.Time) error
}

// Write writes p, failing if that takes longer than w.wait (or goes past the
// time stopBy set).
func (w *wire) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.dmu.Lock()
	w.set = time.Now().Add(w.wait)
	if !w.until.IsZero() && w.until.Before(w.set) {
		w.set = w.until
	}
	w.conn.SetWriteDeadline(w.set)
	w.dmu.Unlock()
	return w.conn.Write(p)
}

// stopBy makes the write in progress, and every later one, end by t (or by
// an earlier time a previous call set: the bound only ever tightens).
func (w *wire) stopBy(t time.Time) {
	w.dmu.Lock()
	defer w.dmu.Unlock()
	if w.until.IsZero() || t.Before(w.until) {
		w.until = t
	}
	t = w.until
	if w.set.IsZero() || w.set.After(t) {
		w.set = t
		w.conn.SetWriteDeadline(t)
	}
}

// appendHeader appends the header of a server frame with an n-byte payload
// (RFC 6455, section 5.2): final, not masked, the shortest length encoding.
func appendHeader(b []byte, opcode byte, n int) []byte {
	b = append(b, 0x80|opcode)
	switch {
	case n < 126:
		return append(b, byte(n))
	case n < 1<<16:
		return binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
	}
}

// appendFrame appends a whole server frame.
func appendFrame(b []byte, opcode byte, payload []byte) []byte {
	return append(appendHeader(b, opcode, len(payload)), payload...)
}

// textFrame frames a JSON payload.
func textFrame(payload []byte) []byte {
	return appendFrame(make([]byte, 0, 10+len(payload)), websocket.TextFrame, payload)
}

// pingFrame is the server's ping, shared by every client.
var pingFrame = appendFrame(nil, websocket.PingFrame, nil)

// appendClose appends a close frame with a status code and reason (RFC 6455,
// section 5.5.1). The reason must fit the 123 bytes a control frame allows.
func appendClose(b []byte, code int, reason string) []byte {
	b = binary.BigEndian.AppendUint16(appendHeader(b, websocket.CloseFrame, 2+len(reason)), uint16(code))
	return append(b, reason...)
}
