// Chat over WebSocket: a room that everyone in it hears.
//
// The hub is the room. A connection joins it, says things, may rename
// itself, and leaves; what one says is broadcast to everyone, the sender
// included. A message goes from one socket to all of them through eight
// places (with the helpers each calls):
//
//	socket.readMessage  the sender's reader reads one whole text message,
//	hub.read            and its loop hands it on
//	hub.handle          to be decoded (decodeMessage) and acted on:
//	hub.say             the hub numbers it under its lock and frames it once (textFrame);
//	hub.broadcastLocked the same bytes go to every client,
//	outbox.put          each client's outbox taking them without waiting;
//	hub.write           each client's writer takes its whole outbox (outbox.take)
//	socket.writeFrames  and writes it at once.
//
// All but the first and last are in this file's first 450 lines; those
// two, with the rest of the socket, are at its end.
//
// Who owns what:
//   - The hub owns what the clients share (who is online, their names and
//     sessions, the message numbers, the history), under one mutex, hub.mu.
//   - A client's outbox is filled under hub.mu without blocking, and
//     emptied by the client's writer. A client whose outbox is full is dropped,
//     never waited for; nothing is written to a socket while hub.mu is
//     held, and putting under it keeps every client's view in seq order.
//     Lock order: hub.mu, then an outbox's or a socket's own.
//   - A client's socket is the only code that touches its connection after
//     the handshake: the client's reader goroutine reads through it, its
//     writer goroutine writes through it, and the socket alone sets
//     deadlines, bounds the closing handshake and waits for the peer's
//     close frame.
//   - A client leaves through one function, hub.leave, with the close code
//     its caller gives.
package main

import (
	"bufio"
	"bytes"
	"container/list"
	"context"
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
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// ----------------------------------------------------------------- the room --

// The room's limits. Text lengths are in characters (runes).
const (
	maxTextChars = 2000     // a message's text, after trimming
	historySize  = 50       // recent messages kept, for welcomes and resumes
	historyBytes = 64 << 10 // and at most this many bytes of them as encoded, so a welcome stays small whatever was said
	welcomeUsers = 100      // users a welcome lists, so it stays small in a large room
)

// hub is the chat room: the http.Handler for GET /ws and everything the
// clients share.
type hub struct {
	log *slog.Logger
	cfg settings
	run string // this server run; every id carries it, and seq restarts with it

	conns    sync.WaitGroup     // one per admitted connection until its goroutines end, for wait; Add under mu
	stopping context.Context    // done once shutdown has begun: every connection then leaves (see attach)
	stop     context.CancelFunc // begins shutdown

	mu       sync.Mutex           // guards the fields below, and every session's fields but id and secret
	admitted int                  // connections past admission, mid-handshake included: at most cfg.maxClients
	clients  map[*client]struct{} // the connections in the room: one per live session
	seq      int64                // the last message's number
	history  history              // the last messages, for welcomes and resumes
	sessions sessions             // who is in the room, or may come back to it, and their names
	presence presence             // the joins and leaves not yet announced
	pinging  bool                 // a round of pings is scheduled
}

// settings are a hub's limits, timings and test hooks, fixed before it
// serves.
type settings struct {
	maxClients   int
	allowOrigins map[string]bool // lower-case "scheme://host[:port]"
	timings

	hook func(c *client, msg []byte) // tests only: runs in the reader before each message
}

func newHub(log *slog.Logger, cfg config) *hub {
	h := &hub{
		log:      log,
		cfg:      settings{maxClients: cfg.maxClients, allowOrigins: make(map[string]bool), timings: cfg.timings},
		run:      strconv.FormatUint(rand.Uint64(), 36),
		clients:  make(map[*client]struct{}),
		sessions: sessions{byID: make(map[string]*session), byName: make(map[string]*session), bases: make(map[string]*nameBase)},
		presence: presence{joined: make(map[*session]bool), left: make(map[*session]user)},
	}
	h.stopping, h.stop = context.WithCancel(context.Background())
	for _, o := range cfg.allowOrigins {
		h.cfg.allowOrigins[strings.ToLower(strings.TrimSuffix(o, "/"))] = true
	}
	return h
}

// say broadcasts a message from c, already checked by decodeMessage, and
// keeps it in the history.
func (h *hub) say(c *client, text string) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.inRoomLocked(c) {
		return
	}
	h.seq++
	msg := encode(message{"message", h.seq, c.s.user(), text, stamp(now)})
	h.history.add(msg)
	h.broadcastLocked(textFrame(msg)) // framed once, for everyone
}

// broadcastLocked puts frame, the same bytes, in every client's outbox
// without blocking. A client whose outbox is full is too slow to keep up,
// and leaves. The caller holds h.mu.
func (h *hub) broadcastLocked(frame []byte) {
	for c := range h.clients {
		if !c.out.put(frame) {
			h.leaveLocked(c, closePolicyViolation, "too slow: outbound queue full")
		}
	}
}

// reply puts a frame in c's outbox alone: an answer, an error, a pong.
func (h *hub) reply(c *client, frame []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inRoomLocked(c) && !c.out.put(frame) {
		h.leaveLocked(c, closePolicyViolation, "too slow: outbound queue full")
	}
}

// join puts c in the room, and its welcome first in its outbox, before
// any broadcast can reach it; it reports false once shutdown has begun. c
// continues the session req.resume names, if it is still kept, or starts a
// new one, and the others hear of it in the next presence frame (unless its
// session never left the room, or left and came back within one).
func (h *hub) join(c *client, req joinRequest) bool {
	name, bad := askedName(req.name)
	secret, now := crand.Text(), time.Now() // before the lock: nothing slow under it
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopping.Err() != nil {
		return false
	}
	s, resumed := h.sessionLocked(c, req.resume, name, secret, now)
	s.client, c.s = c, s
	h.clients[c] = struct{}{}
	h.schedulePresenceLocked()
	h.schedulePingsLocked()
	c.out.put(welcomeFrame(h.welcomeLocked(s, resumed, req.since, now))...)
	if bad != nil && !resumed {
		c.out.put(textFrame(encodeRefusal(bad)))
	}
	return true
}

// leave is how every client leaves, whoever notices first (its reader, its
// writer, the hub, shutdown): c is taken out of the room, if it is still
// there, and its connection closes with code. The close frame goes last
// into c's outbox (alone, for a client closed with 1008, flooding or too
// slow, or 4000, replaced), and from now
// on the socket bounds everything by closeGrace: the writes still to come
// and the wait for the peer's own close frame. A client that stopped
// reading cannot hold its connection, or the server's shutdown, for longer.
func (h *hub) leave(c *client, code int, why string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.leaveLocked(c, code, why)
}

func (h *hub) leaveLocked(c *client, code int, why string) {
	if _, ok := h.clients[c]; ok {
		delete(h.clients, c)
		if s := c.s; s.client == c { // not replaced: the session leaves the room
			h.endLocked(s)
		}
		h.log.Debug("dropping client", "client", c.s.id, "code", code, "reason", why)
	}
	discard := code == closePolicyViolation || code == closeReplaced
	if c.out.close(closeFrame(code, why), discard) {
		c.sock.closeBy(time.Now().Add(h.cfg.closeGrace))
	}
}

// inRoomLocked reports whether c is still in the room (not gone, and the
// server not shutting down). The caller holds h.mu.
func (h *hub) inRoomLocked(c *client) bool {
	_, ok := h.clients[c]
	return ok && h.stopping.Err() == nil
}

// ---------------------------------------- a client: its outbox, reader, writer --
//
// Each client in the room has two goroutines on its connection: a reader
// that hands each message it reads to the hub, and a writer that sends what
// the hub put in its outbox. With the room above, this is the whole idea.

// A client's outbox holds at most sendQueueFrames frames and sendQueueBytes
// bytes, the batch its writer is writing included: a client whose outbox is
// full when a frame arrives is too slow, and leaves. Every frame counts at
// its size, shared or not: once the others have written a broadcast, a
// client that does not read keeps it alive alone.
const (
	sendQueueFrames = 256
	sendQueueBytes  = 128 << 10 // room for a welcome with the whole history
)

// client is one connection to the chat, and the session speaking through it.
type client struct {
	s          *session      // set by join, then fixed
	sock       *socket       // the connection; set by attach during the handshake
	out        outbox        // frames for the writer
	writerDone chan struct{} // closed when the writer goroutine exits
	unwatch    func() bool   // stops the shutdown watch attach set up
}

func newClient() *client {
	return &client{out: outbox{wake: make(chan struct{}, 1)}, writerDone: make(chan struct{})}
}

// outbox is a client's queue of frames, framed for the wire, waiting for its
// writer: the hub puts them in one at a time (messages, pings, replies), the
// writer takes all of them at once. A close frame is the last one in.
type outbox struct {
	mu     sync.Mutex // guards the fields below
	frames [][]byte   // at most sendQueueFrames (and a close frame)
	bytes  int        // of frames and of the writer's batch: at most sendQueueBytes (and a close frame)
	batch  int        // bytes of the batch the writer took last; it is written when the writer comes back
	closed bool       // a close frame is queued: nothing more goes in

	wake chan struct{} // one slot: a signal that frames arrived
}

// put queues frames: one, or the pieces of one (a welcome). It reports
// false when the box is full (or closed).
func (o *outbox) put(frames ...[]byte) bool {
	n := 0
	for _, f := range frames {
		n += len(f)
	}
	o.mu.Lock()
	ok := !o.closed && len(o.frames) < sendQueueFrames && o.bytes+n <= sendQueueBytes
	if ok {
		o.frames = append(o.frames, frames...)
		o.bytes += n
	}
	o.mu.Unlock()
	o.signal()
	return ok
}

// close queues a close frame last, and reports whether it did: not when
// one is queued already. discard drops the frames queued before it.
func (o *outbox) close(frame []byte, discard bool) bool {
	o.mu.Lock()
	first := !o.closed
	if first {
		if discard {
			clear(o.frames)
			o.frames = o.frames[:0]
			o.bytes = o.batch
		}
		o.frames = append(o.frames, frame)
		o.bytes += len(frame)
		o.closed = true
	}
	o.mu.Unlock()
	o.signal()
	return first
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// take empties the box for the writer, which has written the batch it took
// before, and reports whether its last frame is the close frame.
func (o *outbox) take() (frames [][]byte, last bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	frames, o.frames = o.frames, nil
	o.bytes -= o.batch
	o.batch = o.bytes
	return frames, o.closed
}

// serve runs c once its handshake is done: its writer on a goroutine of
// its own, its reader on this one. Once the reader has read its last (and
// c has left), serve reads and drops what the peer still sends, up to its
// close frame, waits for the writer to send c's close frame, and closes the
// connection: all within closeGrace of leaving. joined says whether join
// let c in; a client refused at shutdown only gets its close frame. A panic
// in the reader closes this connection alone, with 1011.
func (h *hub) serve(c *client, joined bool) {
	defer h.release()
	defer c.unwatch()
	go h.write(c)
	defer func() {
		<-c.writerDone
		c.sock.Close()
	}()
	defer recoverTo(h.log, "chat reader", func() { h.leave(c, closeInternalError, "internal error") })
	if joined {
		h.read(c)
	}
	c.sock.linger()
}

// read is c's reader: it hands each message c sends to the hub, until the
// peer closes (its close frame is answered with its own code), breaks
// RFC 6455 (closed with the code readMessage chose), goes, or stays silent
// for readIdle. Once c is out of the room the hub ignores what it hands on.
func (h *hub) read(c *client) {
	limit := newBucket(rateBurst, ratePerSecond)
	strikes := newBucket(floodStrikes, floodStrikes/floodWindow.Seconds())
	pong := func(p []byte) { h.reply(c, pongFrame(p)) }
	for {
		msg, err := c.sock.readMessage(pong)
		var ce *closeError
		if errors.As(err, &ce) {
			h.leave(c, ce.code, ce.reason)
			return
		}
		if err != nil {
			h.log.Debug("read ended", "client", c.s.id, "err", err)
			h.leave(c, closeNormal, "")
			return
		}
		if now := time.Now(); !limit.take(now) {
			if !strikes.take(now) {
				h.leave(c, closePolicyViolation, "flooding")
				continue // out of the room: what it still sends is read and ignored
			}
			h.reply(c, textFrame(encodeRefusal(&refusal{errRateLimited, "too many messages: at most " +
				strconv.Itoa(rateBurst) + " at once or " + strconv.Itoa(ratePerSecond) + " a second"})))
			continue
		}
		if h.cfg.hook != nil {
			h.cfg.hook(c, msg)
		}
		if ref := h.handle(c, msg); ref != nil {
			h.reply(c, textFrame(encodeRefusal(ref)))
		}
	}
}

// write is c's writer, the only goroutine that writes to c's socket after
// the handshake: each time it wakes, the whole outbox in one write. It ends
// once the close frame is out, or when a write fails: c then leaves, too
// slow if the write blocked past the write timeout, gone otherwise. The
// close frame may still go when the failed write sent nothing of its
// batch, so that the stream is between two frames (after half a frame, a
// close frame would be read as its payload). A panic here closes this
// connection, with 1011 written by the recovery itself when the stream is
// between frames: nothing else would empty the outbox.
func (h *hub) write(c *client) {
	defer close(c.writerDone)
	defer recoverTo(h.log, "chat writer", func() {
		h.leave(c, closeInternalError, "internal error")
		if !c.sock.midFrame {
			c.sock.writeFrames([][]byte{closeFrame(closeInternalError, "internal error")})
		}
	})
	for range c.out.wake {
		frames, last := c.out.take()
		_, err := c.sock.writeFrames(frames)
		if err == nil {
			if last {
				return
			}
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			h.leave(c, closePolicyViolation, "too slow: a write blocked past the write timeout")
		} else {
			h.leave(c, closeNormal, "gone: a write failed")
		}
		if !c.sock.midFrame && !last {
			continue // the close frame is queued: it may still go, within closeGrace
		}
		c.sock.closeBy(time.Now()) // nothing more can be said: the reader stops too
		return
	}
}

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

// refusalQuoteBytes is the most of a client's own text that a refusal quotes back.
const refusalQuoteBytes = 24

// pongReply answers a client's {"type":"ping"}, framed once for everyone.
var pongReply = textFrame([]byte(`{"type":"pong"}`))

// decodeMessage parses and checks a client's message, valid UTF-8 already
// (see readMessage). It refuses what is not a JSON object, an unknown type,
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
		return in, &refusal{errUnknownType, "unknown message type " + quote(in.Type) + ": want message, rename or ping"}
	}
	return in, nil
}

// quote quotes s, or its first refusalQuoteBytes, for a refusal: what a
// client sent is quoted back, but never enough to make the refusal grow
// with it.
func quote(s string) string {
	if len(s) <= refusalQuoteBytes {
		return strconv.Quote(s)
	}
	cut := refusalQuoteBytes
	for !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strconv.Quote(s[:cut]) + "…"
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

// ------------------------------------ sessions, history, names and presence --
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
	ended   *list.Element // its place in sessions.ended, while client is nil
	endedAt time.Time
}

func (s *session) user() user { return user{s.id, s.name} }

// sessions is who the hub knows: the live sessions and the ended ones that
// may still resume, and the names the live ones hold.
type sessions struct {
	byID   map[string]*session  // the live sessions, and the ended ones that may resume
	ended  list.List            // the ended ones, oldest first, at most maxEndedSessions
	lastID int64                // the last new session's number
	byName map[string]*session  // live sessions by foldName(name), to keep names unique
	bases  map[string]*nameBase // by foldName of a name asked for
}

// nameBase is what the hub keeps for one name asked for: the next suffix to
// try when it is taken, and how many live sessions asked for it.
type nameBase struct{ next, holders int }

// presence is what the next presence frame announces.
type presence struct {
	joined    map[*session]bool
	left      map[*session]user // with the name it left under
	scheduled bool              // a flush is on its way
}

// history is the last messages, encoded, oldest first: at most historySize
// of them and historyBytes in all. 50 messages of 2 000 "<", which
// encoding/json writes as \u003c, would be 600 KB; a welcome carries the
// history, so this bounds what each join costs (TestWelcomeStaysSmallAfterTheLargestMessages).
type history struct {
	msgs  [][]byte
	bytes int
	json  []byte // msgs as one JSON array, built on the first join after a change
}

// add keeps msg, forgetting the oldest messages past either bound.
func (hs *history) add(msg []byte) {
	hs.msgs = append(hs.msgs, msg)
	hs.bytes += len(msg)
	drop := 0
	for len(hs.msgs)-drop > historySize || hs.bytes > historyBytes {
		hs.bytes -= len(hs.msgs[drop])
		drop++
	}
	hs.msgs = slices.Delete(hs.msgs, 0, drop)
	hs.json = nil
}

// all returns the whole history as a JSON array. The array is replaced, never
// changed, so joins share it.
func (hs *history) all() []byte {
	if hs.json == nil {
		hs.json = jsonArray(hs.msgs)
	}
	return hs.json
}

func jsonArray(msgs [][]byte) []byte {
	return append(append([]byte("["), bytes.Join(msgs, []byte(","))...), ']')
}

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
		h.sessions.lastID++
		s = &session{id: h.run + "-" + strconv.FormatInt(h.sessions.lastID, 10), secret: secret}
		h.sessions.byID[s.id] = s
		h.takeNameLocked(s, name, name)
		h.presence.joined[s] = true
		return s, false
	case s.client != nil:
		// Its old connection is still open: the server has not noticed it
		// drop, or the page opened another. The session never left the room,
		// so nobody hears of the switch.
		old := s.client
		s.client = c // first, so that old leaving does not end the session
		h.leaveLocked(old, closeReplaced, "replaced by a new connection")
	default:
		// Back within resumeWindow, under its old name if that is free.
		h.sessions.ended.Remove(s.ended)
		s.ended = nil
		oldName := s.name
		h.takeNameLocked(s, s.name, s.asked)
		if _, ok := h.presence.left[s]; ok && s.name == oldName {
			delete(h.presence.left, s) // left and came back inside one window: in neither list
		} else {
			h.presence.joined[s] = true
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
		oldest := h.seq - int64(len(h.history.msgs)) + 1 // the seq of the oldest message kept
		since = min(since, h.seq)
		from := max(since+1, oldest)
		w.Missed = from - (since + 1)
		return w, jsonArray(h.history.msgs[from-oldest:])
	}
	return w, h.history.all()
}

// welcomeFrame frames w with its history, already encoded, as its last
// field: three pieces that the writer sends as one frame. The history is
// spliced in, shared, not encoded again: as a json.RawMessage it would be
// validated and copied for every join, 317 µs and 132 KB with a full
// history against 3 µs and 1.7 KB (BenchmarkJoinWithFullHistory), and a
// joiner that never reads would hold its own copy.
func welcomeFrame(w welcome, history []byte) [][]byte {
	head := encode(w)
	head = append(head[:len(head)-1], `,"history":`...) // all but the closing brace, then the last field's name
	first := appendHeader(make([]byte, 0, 10+len(head)), websocket.TextFrame, len(head)+len(history)+1)
	return [][]byte{append(first, head...), history, closingBrace}
}

var closingBrace = []byte("}")

// endLocked takes s out of the room: its leave is announced, its name is
// free, and it waits in h.sessions.ended for a resume. The caller holds h.mu.
func (h *hub) endLocked(s *session) {
	if h.presence.joined[s] {
		delete(h.presence.joined, s) // joined and left inside one window: in neither list
	} else if h.stopping.Err() == nil {
		h.presence.left[s] = s.user()
		h.schedulePresenceLocked()
	}
	h.releaseNameLocked(s)
	s.client, s.endedAt = nil, time.Now()
	s.ended = h.sessions.ended.PushBack(s)
	h.forgetEndedLocked(s.endedAt)
}

// resumableLocked returns the session token continues, or nil (a new session,
// not an error). The secret is compared in constant time, so that how long
// the answer takes tells a guesser nothing. The caller holds h.mu.
func (h *hub) resumableLocked(token string) *session {
	id, secret, ok := strings.Cut(token, ".")
	s := h.sessions.byID[id]
	if !ok || s == nil || subtle.ConstantTimeCompare([]byte(secret), []byte(s.secret)) != 1 {
		return nil
	}
	return s
}

// forgetEndedLocked forgets the sessions that ended more than resumeWindow
// before now, and the oldest past maxEndedSessions. The caller holds h.mu.
func (h *hub) forgetEndedLocked(now time.Time) {
	ended := &h.sessions.ended
	for e := ended.Front(); e != nil; e = ended.Front() {
		s := e.Value.(*session)
		if ended.Len() <= maxEndedSessions && now.Sub(s.endedAt) <= h.cfg.resumeWindow {
			return
		}
		ended.Remove(e)
		s.ended = nil
		delete(h.sessions.byID, s.id)
	}
}

// takeNameLocked gives s the name prefer if no live session has it, and
// otherwise asked with the next free "-N" suffix. Each name asked for keeps
// its next suffix, so that the ten-thousandth "ann" is a look-up or two, not
// a scan of ann-2, ann-3... under the lock. A long name cut to fit its
// suffix can meet another name's suffixes ("a"×30 + "-2" against the
// holders of 32 "a"); after a few such, each try is at random among four
// times as many suffixes as there are names, so it costs a try or two
// whatever the room (BenchmarkJoinSameName). The caller holds h.mu.
func (h *hub) takeNameLocked(s *session, prefer, asked string) {
	b := h.sessions.bases[foldName(asked)]
	if b == nil {
		b = &nameBase{next: 2}
		h.sessions.bases[foldName(asked)] = b
	}
	b.holders++
	name := prefer
	for tries := 0; h.sessions.byName[foldName(name)] != nil; tries++ {
		n := b.next
		if tries < 4 {
			b.next++
		} else { // at most a quarter of these are taken
			n += rand.IntN(4 * len(h.sessions.byName))
		}
		name = withSuffix(asked, n)
	}
	s.name, s.asked = name, asked
	h.sessions.byName[foldName(name)] = s
}

// releaseNameLocked frees s's name. The caller holds h.mu.
func (h *hub) releaseNameLocked(s *session) {
	if h.sessions.byName[foldName(s.name)] == s {
		delete(h.sessions.byName, foldName(s.name))
	}
	if b := h.sessions.bases[foldName(s.asked)]; b != nil {
		if b.holders--; b.holders == 0 {
			delete(h.sessions.bases, foldName(s.asked))
		}
	}
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
	h.broadcastLocked(textFrame(encode(struct {
		Type string `json:"type"` // "rename"
		User user   `json:"user"`
		Old  string `json:"old"`
		Time string `json:"time"`
	}{"rename", s.user(), old, stamp(now)})))
	return nil
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
	if !h.presence.scheduled {
		h.presence.scheduled = true
		h.after(presenceEvery, "presence", h.flushPresence)
	}
}

// flushPresence broadcasts one presence frame covering every join and leave
// since the last one.
func (h *hub) flushPresence() {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.presence
	// New maps, not cleared ones: a storm's entries should not stay allocated.
	h.presence = presence{joined: make(map[*session]bool), left: make(map[*session]user)}
	if h.stopping.Err() != nil || len(p.joined) == 0 && len(p.left) == 0 {
		return
	}
	joined := make([]user, 0, min(len(p.joined), presenceNames))
	for s := range p.joined {
		if len(joined) == presenceNames {
			break
		}
		joined = append(joined, s.user())
	}
	left := make([]user, 0, min(len(p.left), presenceNames))
	for _, u := range p.left {
		if len(left) == presenceNames {
			break
		}
		left = append(left, u)
	}
	h.broadcastLocked(textFrame(encode(struct {
		Type        string `json:"type"` // "presence"
		Online      int    `json:"online"`
		Joined      []user `json:"joined"`
		Left        []user `json:"left"`
		JoinedCount int    `json:"joinedCount"`
		LeftCount   int    `json:"leftCount"`
		Time        string `json:"time"`
	}{"presence", len(h.clients), joined, left, len(p.joined), len(p.left), stamp(now)})))
}

// --------------------------------------- a connection's beginning, shutdown --
//
// Why this exists: to turn an HTTP request into a client in the room, to
// keep it alive, and to end them all at shutdown. A first reading may skip
// it.

// A connection's timing.
const (
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
	if !h.admit() {
		http.Error(w, "chat is full, or the server is stopping: try again later", http.StatusServiceUnavailable)
		return
	}
	c := newClient()
	var req joinRequest
	// x/net calls Handshake and then Handler on this goroutine, before
	// ServeHTTP returns: req and started need no lock. Until serve owns the
	// connection (a failed handshake, or a panic in join), this gives it up.
	started := false
	defer func() {
		if !started {
			if c.sock != nil {
				c.unwatch()
				c.sock.Close()
			}
			h.release()
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
			if !joined {
				h.leave(c, closeGoingAway, "server shutting down")
			}
			go h.serve(c, joined)
			started = true
		},
	}
	ws.ServeHTTP(hijacker{w, h, c}, r)
}

// online reports how many people are in the room.
func (h *hub) online() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.clients)
}

// shutdown refuses new clients and has every connection leave with 1001,
// those still in their handshake too (see attach). It does not wait; see wait.
func (h *hub) shutdown() { h.stop() }

// wait blocks until every connection has closed, or ctx is done. It takes
// h.mu first, so that it comes after every conns.Add so far (admit's, made
// under h.mu), as a WaitGroup asks.
func (h *hub) wait(ctx context.Context) error {
	h.mu.Lock()
	h.mu.Unlock()
	return waitFor(ctx, &h.conns, "chat connections")
}

// admit counts a connection in, unless cfg.maxClients are in already. It
// runs before the hijack, while net/http's Shutdown still waits for the
// request; from then on conns does.
func (h *hub) admit() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.admitted == h.cfg.maxClients || h.stopping.Err() != nil {
		return false
	}
	h.admitted++
	h.conns.Add(1)
	return true
}

// release counts a connection out, once its goroutines are done with it.
func (h *hub) release() {
	h.mu.Lock()
	h.admitted--
	h.mu.Unlock()
	h.conns.Done()
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
	if strings.EqualFold(u.Host, r.Host) || h.cfg.allowOrigins[strings.ToLower(u.Scheme+"://"+u.Host)] {
		return nil
	}
	return fmt.Errorf("origin %s may not open a WebSocket on %s (see -allow-origin)", origin, r.Host)
}

// attach makes conn, read through r, c's socket, and has c leave with 1001
// as soon as shutdown begins: in the room, or still in its handshake (a 101
// stuck in a full socket is then cut within closeGrace, as a stuck client's
// writes are).
func (h *hub) attach(c *client, conn net.Conn, r io.Reader) {
	c.sock = newSocket(conn, r, h.cfg.readIdle, h.cfg.write)
	c.unwatch = context.AfterFunc(h.stopping, func() {
		defer recoverTo(h.log, "shutdown", nil)
		h.leave(c, closeGoingAway, "server shutting down")
	})
}

// schedulePingsLocked makes sure a round of pings is on its way. The caller
// holds h.mu.
func (h *hub) schedulePingsLocked() {
	if !h.pinging {
		h.pinging = true
		h.after(h.cfg.ping, "pings", h.pingAll)
	}
}

// pingAll queues a ping for every client, and schedules the next round while
// anyone is in the room. One timer for the whole hub, rather than a ticker
// per client, keeps an idle connection cheap.
func (h *hub) pingAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pinging = false
	if h.stopping.Err() != nil || len(h.clients) == 0 {
		return
	}
	h.schedulePingsLocked()
	h.broadcastLocked(pingFrame)
}

// after runs f once d has passed, on a goroutine of its own: the hub's two
// timers, presence and pings. A panic in f is logged, and the room serves
// on (TestPanicInATimerIsLoggedAndTheRoomServesOn).
func (h *hub) after(d time.Duration, what string, f func()) {
	time.AfterFunc(d, func() {
		defer recoverTo(h.log, what, nil)
		f()
	})
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
// messages (the rate limit), its refused messages (the flood limit) and, in
// its socket, its pings. Only that reader uses them.
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
// inner white space collapsed, or a refusal. A name may not hold a control
// character or one that shows nothing of its own, and must show something,
// so that no name can hide text or pass for another by an invisible
// difference.
func cleanName(s string) (string, *refusal) {
	if !utf8.ValidString(s) {
		return "", &refusal{errBadName, "name is not valid UTF-8"}
	}
	s = strings.Join(strings.Fields(s), " ")
	if s == "" {
		return "", &refusal{errBadName, "name is empty"}
	}
	if i := strings.IndexFunc(s, invisible); i >= 0 {
		r, _ := utf8.DecodeRuneInString(s[i:])
		return "", &refusal{errBadName, fmt.Sprintf("name holds a control or invisible character (%U)", r)}
	}
	if !strings.ContainsFunc(s, func(r rune) bool { return unicode.In(r, unicode.L, unicode.N, unicode.P, unicode.S) }) {
		return "", &refusal{errBadName, "name shows nothing: it needs a letter, digit, punctuation or symbol"}
	}
	if utf8.RuneCountInString(s) > maxNameChars {
		return "", &refusal{errBadName, "name is over " + strconv.Itoa(maxNameChars) + " characters"}
	}
	return s, nil
}

// invisible reports whether r shows nothing of its own: a control or
// format character, one of Unicode's other Default_Ignorable_Code_Points
// (the combining grapheme joiner, Hangul fillers, variation selectors), or
// the braille blank, a letter-sized space. (U+FFFD, which stands for bytes
// that were not text, is refused with them.)
func invisible(r rune) bool {
	return unicode.IsControl(r) || r == '\u2800' || r == utf8.RuneError ||
		unicode.In(r, unicode.Cf, unicode.Other_Default_Ignorable_Code_Point, unicode.Variation_Selector)
}

// ------------------------------------------------------------- the socket --
//
// Why this exists: pollfree speaks RFC 6455 itself, so that a text chat
// never relays a message that is not whole, valid UTF-8, and so that one
// type owns the connection: the room and a client's loops above use five
// of its methods (readMessage, writeFrames, closeBy, linger, Close), and
// never set a deadline or parse a frame. The frames they hand it are built
// by the small functions at the end (textFrame, closeFrame...). A first
// reading may skip it.
//
// Which part of the wire is whose:
//   - x/net/websocket checks the opening handshake (net/http has read it:
//     method, upgrade headers, a key, version 13) and writes the 101 answer
//     through the socket (hijacker, below), with the subprotocol ServeHTTP
//     selected. That is all it does: its Conn is never read or written, so
//     it never answers a ping or writes a close frame of its own.
//   - After the handshake, the socket reads every frame (readMessage:
//     fragments, control frames, UTF-8, close codes) and writes every frame
//     the client's writer hands it. Server frames are simple: final,
//     unmasked, a two- to ten-byte header.

// Frame-level limits (RFC 6455, section 5).
const (
	// maxMessageBytes bounds a client's message, all its fragments together;
	// more closes with 1009. Every message of maxTextChars fits, however a
	// JSON encoder escapes it: 2 000 characters as surrogate-pair escapes
	// (\ud83d\ude00) are 24 KB.
	maxMessageBytes = 32 << 10
	maxControlBytes = 125 // a control frame's payload, at most (RFC 6455, section 5.5)
	// The buffers the connection is read and its handshake written through;
	// net/http's 4 KiB pair would be most of an idle client.
	connReadBufferBytes  = 512
	connWriteBufferBytes = 256
	// connSendBufferBytes is the kernel's send buffer for a chat connection
	// (Linux doubles it for its own bookkeeping): what a client that stops
	// reading holds in the kernel, beside its outbox. Left to itself, the
	// kernel grows it to megabytes.
	connSendBufferBytes = 16 << 10
)

// WebSocket close codes (RFC 6455, section 7.4.1).
const (
	closeNormal          = 1000
	closeGoingAway       = 1001 // server shutting down
	closeProtocolError   = 1002 // a frame that breaks RFC 6455
	closeUnsupported     = 1003 // a binary frame: the protocol is JSON text
	closeBadData         = 1007 // a text message that is not UTF-8
	closePolicyViolation = 1008 // flooding, or too slow to read
	closeTooBig          = 1009 // a message over maxMessageBytes
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

// socket is one chat connection after its handshake. Its reader half
// (readMessage, linger) is the client's reader goroutine's alone, its writer
// half (writeFrames) the writer goroutine's; closeBy may come from anywhere.
type socket struct {
	conn            net.Conn
	br              *bufio.Reader // conn, after what came with the handshake
	idle, writeWait time.Duration

	// The writer's: whether its last write stopped inside a frame, or a
	// panic left that unknown. Nothing more may be written then.
	midFrame bool

	// The reader's: the data message being put together, and the frame being read.
	msg   []byte // nil when no message is open
	valid int    // how much of msg is checked UTF-8
	op    byte   // the current frame's opcode
	left  int64  // what is still unread of its payload
	pings bucket

	mu    sync.Mutex // orders every deadline set on conn: the reader's, the writer's and closeBy's
	until time.Time  // once closing: no read or write lasts past it
}

func newSocket(conn net.Conn, r io.Reader, idle, writeWait time.Duration) *socket {
	s := &socket{conn: conn, br: bufio.NewReaderSize(r, connReadBufferBytes), idle: idle, writeWait: writeWait, pings: newBucket(pingBurst, pingsPerSecond)}
	s.deadline(conn.SetReadDeadline, idle) // for the first frame
	if tcp := tcpBeneath(conn); tcp != nil {
		tcp.SetWriteBuffer(connSendBufferBytes)
	}
	return s
}

// header is one frame's header.
type header struct {
	fin, masked bool
	rsv, opcode byte
	length      int64
	key         [4]byte
}

// readMessage returns the next whole text message. Control frames between
// its fragments, or between messages, are handled here: a ping is answered
// through pong with its payload, a pong only shows the peer is there, a
// close frame ends the connection. It returns a *closeError when the
// connection must close with a code, and otherwise only the connection's
// own errors (the peer went, or sent nothing for idle). A message is judged
// as it arrives: it fails at the first byte that cannot be valid UTF-8.
func (s *socket) readMessage(pong func(payload []byte)) ([]byte, error) {
	for {
		f, err := s.header()
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
			if err := s.payload(p, f.key, false); err != nil {
				return nil, err
			}
			switch {
			case f.opcode == websocket.CloseFrame:
				return nil, peerClose(p)
			case f.opcode == websocket.PongFrame:
			case !s.pings.take(time.Now()):
				return nil, fail(closePolicyViolation, "ping flood")
			default:
				pong(p)
			}
			continue
		case websocket.TextFrame, websocket.BinaryFrame:
			if s.msg != nil {
				return nil, fail(closeProtocolError, "a new message inside a fragmented one")
			}
			if f.opcode == websocket.BinaryFrame {
				return nil, fail(closeUnsupported, "text frames only")
			}
		case websocket.ContinuationFrame:
			if s.msg == nil {
				return nil, fail(closeProtocolError, "a continuation with no message to continue")
			}
		default:
			return nil, fail(closeProtocolError, "reserved opcode "+strconv.Itoa(int(f.opcode)))
		}
		if f.length > maxMessageBytes-int64(len(s.msg)) { // not a sum: a length near 2^63 would wrap
			return nil, fail(closeTooBig, "message over "+strconv.Itoa(maxMessageBytes)+" bytes")
		}
		if s.msg == nil {
			s.msg, s.valid = make([]byte, 0, f.length), 0
		}
		start := len(s.msg)
		s.msg = slices.Grow(s.msg, int(f.length))[:start+int(f.length)]
		if err := s.payload(s.msg[start:], f.key, true); err != nil {
			return nil, err
		}
		if f.fin {
			msg := s.msg
			s.msg = nil
			if !s.checkUTF8(msg, true) {
				return nil, fail(closeBadData, "text message is not valid UTF-8")
			}
			return msg, nil
		}
	}
}

// header reads a frame's header; any frame shows the peer is there, so it
// moves the read deadline idle on.
func (s *socket) header() (f header, err error) {
	var b [2]byte
	for i := range b {
		if b[i], err = s.br.ReadByte(); err != nil {
			return f, err
		}
	}
	s.deadline(s.conn.SetReadDeadline, s.idle)
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
		c, err := s.br.ReadByte()
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
		if f.key[i], err = s.br.ReadByte(); err != nil {
			return f, err
		}
	}
	s.op, s.left = f.opcode, f.length
	return f, nil
}

// payload reads the current frame's payload into p, unmasking it. A text
// fragment (p then ends s.msg) is checked piece by piece as it arrives.
func (s *socket) payload(p []byte, key [4]byte, text bool) error {
	start := len(s.msg) - len(p)
	for got := 0; got < len(p); {
		n, err := s.br.Read(p[got:])
		for i := got; i < got+n; i++ {
			p[i] ^= key[i%4]
		}
		got += n
		s.left -= int64(n)
		if text && !s.checkUTF8(s.msg[:start+got], false) {
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
func (s *socket) checkUTF8(msg []byte, whole bool) bool {
	rest := msg[s.valid:]
	if utf8.Valid(rest) {
		s.valid = len(msg)
		return true
	}
	for len(rest) > 0 {
		r, size := utf8.DecodeRune(rest)
		if r == utf8.RuneError && size == 1 {
			return !whole && !utf8.FullRune(rest) // FullRune is false only for a valid beginning
		}
		rest = rest[size:]
		s.valid += size
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

// writeFrames writes frames, failing if that takes longer than writeWait
// (or past closeBy's bound). It reports how many bytes went. The frames go
// as they are, never copied into one buffer: net.Buffers is one writev
// system call on a TCP connection (over TLS, a write a frame).
func (s *socket) writeFrames(frames [][]byte) (n int64, err error) {
	s.deadline(s.conn.SetWriteDeadline, s.writeWait)
	s.midFrame = true     // until the write returns
	if len(frames) == 1 { // most batches: a plain write costs less than a writev
		var k int
		k, err = s.conn.Write(frames[0])
		n = int64(k)
	} else {
		bufs := net.Buffers(frames)
		n, err = bufs.WriteTo(s.conn)
	}
	s.midFrame = err != nil && n > 0
	return n, err
}

// Write writes p as writeFrames does: x/net's handshake answer goes through it.
func (s *socket) Write(p []byte) (int, error) {
	n, err := s.writeFrames([][]byte{p})
	return int(n), err
}

// deadline sets a read or write deadline d from now, but not past closeBy's bound.
func (s *socket) deadline(set func(time.Time) error, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := time.Now().Add(d)
	if !s.until.IsZero() && s.until.Before(t) {
		t = s.until
	}
	set(t)
}

// closeBy makes every read and write end by t, those in progress too (or by
// an earlier time a previous call set: the bound only tightens). leave calls
// it, so that a peer that stopped reading cannot hold the connection.
func (s *socket) closeBy(t time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.until.IsZero() || t.Before(s.until) {
		s.until = t
		s.conn.SetDeadline(t)
	}
}

// linger reads and drops what the peer still sends once the connection is
// closing, up to its close frame, within closeBy's bound: closed with bytes
// unread, the connection would be reset, and the peer could lose the close
// frame that says why.
func (s *socket) linger() {
	for {
		if _, err := s.br.Discard(int(s.left)); err != nil || s.op == websocket.CloseFrame {
			return
		}
		if _, err := s.header(); err != nil {
			return
		}
	}
}

// Close closes the connection, within closeBy's bound (see closeWithin).
func (s *socket) Close() error {
	s.mu.Lock()
	bound := s.until
	s.mu.Unlock()
	return closeWithin(s.conn, bound)
}

// hijacker hands x/net the connection as the client's socket: x/net reads
// the handshake through the socket's small read buffer and writes its
// answer through the socket, and readMessage reads the same buffer
// afterwards. With net/http's 4 KiB pair instead, a client held 20.9 KB
// against 15.8 (BenchmarkCapacityChat, 5 000 clients).
type hijacker struct {
	http.ResponseWriter
	h *hub
	c *client
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
	hj.h.attach(hj.c, conn, r)
	s := hj.c.sock
	// New small buffers, so that net/http's can go with its request.
	return keepOpen{conn}, bufio.NewReadWriter(s.br, bufio.NewWriterSize(s, connWriteBufferBytes)), nil
}

// keepOpen is the connection as x/net sees it: x/net closes it when its
// handler returns, but serve goes on, on a goroutine of its own, and closes
// it. Serving on net/http's goroutine instead would keep the request's
// buffers and deep stack: 31.6 KB a client against 16.1
// (BenchmarkCapacityChat, 5 000 clients).
type keepOpen struct{ net.Conn }

func (keepOpen) Close() error { return nil }

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

// textFrame frames a JSON payload.
func textFrame(payload []byte) []byte {
	return append(appendHeader(make([]byte, 0, 10+len(payload)), websocket.TextFrame, len(payload)), payload...)
}

// pongFrame answers a ping with its payload.
func pongFrame(payload []byte) []byte {
	return append(appendHeader(nil, websocket.PongFrame, len(payload)), payload...)
}

// pingFrame is the server's ping, shared by every client.
var pingFrame = appendHeader(nil, websocket.PingFrame, 0)

// closeFrame is a close frame with a status code and reason (RFC 6455,
// section 5.5.1). The reason must fit the 123 bytes a control frame allows.
func closeFrame(code int, reason string) []byte {
	b := binary.BigEndian.AppendUint16(appendHeader(nil, websocket.CloseFrame, 2+len(reason)), uint16(code))
	return append(b, reason...)
}
