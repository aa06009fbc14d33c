// Chat over WebSocket: first the room, then one connection's life, then the
// limits, and last the machinery x/net/websocket leaves to us.
//
// Who owns what:
//   - The hub is the room. It owns everything the clients share, under one
//     mutex (hub.mu): who is online, their names, the sessions that may
//     still resume, the message sequence number, the history, and the joins
//     and leaves not yet announced.
//   - A person in the room is a session: an id, a name and a secret resume
//     token. It speaks through one connection at a time, a client. When that
//     connection drops, the session waits resumeWindow for the page to come
//     back (GET /ws?resume=TOKEN&since=SEQ) as the same person, with the
//     messages it missed.
//   - A broadcast encodes and frames its message once and, under hub.mu,
//     puts the same bytes in every client's outbox without blocking.
//     Putting under the lock is what keeps every client's view in seq order.
//     A client whose outbox is full is dropped, never waited for, and nothing
//     touches a socket while hub.mu is held. Lock order: hub.mu, then an
//     outbox's own.
//   - A client has two goroutines. Its reader is the only reader of the
//     socket; it decodes frames and calls into the hub. Its writer empties
//     the outbox, the whole backlog in one write. x/net writes too (pongs,
//     from inside the reader's Read), so every write goes through the
//     client's wire, which owns the write deadline.
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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// Chat limits. Sizes are in bytes, text lengths in characters (runes).
const (
	maxFrameBytes    = 8 << 10                // a client frame's payload, at most; more closes with 1009
	maxTextChars     = 2000                   // a message's text, after trimming
	maxNameChars     = 32                     // a display name, after trimming
	historySize      = 50                     // recent messages kept, for welcomes and resumes
	resumeWindow     = 2 * time.Minute        // how long an ended session may be resumed
	maxEndedSessions = 10_000                 // ended sessions kept for that, oldest forgotten first
	welcomeUsers     = 100                    // users a welcome lists, so it stays small in a large room
	presenceEvery    = 250 * time.Millisecond // joins and leaves within it share one presence frame
	presenceNames    = 20                     // names in each presence list; the counts carry the totals
	// sendQueueFrames bounds a client's outbox; a client whose outbox is full
	// when a frame arrives is dropped. Frames are shared: one costs 24 bytes.
	sendQueueFrames = 256
	// writeWait bounds each write to a client, the writer's and x/net's pongs
	// alike; a write that takes longer drops the client.
	writeWait = 10 * time.Second
	// The server pings every client each pingEvery (one timer for the room),
	// and a client that sends nothing, not even a pong, for readIdle is gone:
	// a vanished peer is removed within 75 s. pingEvery must be well under readIdle.
	pingEvery = 30 * time.Second
	readIdle  = 75 * time.Second
	// closeGrace bounds every write to a client once it is out of the room,
	// then the wait for its close frame. A stuck client costs it twice at
	// shutdown, well inside shutdownTimeout.
	closeGrace = time.Second
	// The buffers x/net reads frames through and writes its handshake and
	// pongs through; net/http's 4 KiB pair would be most of an idle client.
	// The write buffer must hold a whole control frame (127 bytes), so that a
	// pong is one write and cannot split a batch.
	connReadBufferBytes  = 512
	connWriteBufferBytes = 256
	// A client may send rateBurst frames at once, refilled at ratePerSecond;
	// more are refused. floodStrikes refusals within about floodWindow close
	// it with 1008 (a second bucket, so that a flooder let through now and
	// then as the first refills is not forgiven).
	rateBurst     = 10
	ratePerSecond = 5
	floodStrikes  = 30
	floodWindow   = 10 * time.Second
)

// WebSocket close codes (RFC 6455, section 7.4.1).
const (
	closeNormal          = 1000
	closeGoingAway       = 1001 // server shutting down
	closeProtocolError   = 1002 // a frame with a reserved opcode
	closeUnsupported     = 1003 // a binary frame: the protocol is JSON text
	closePolicyViolation = 1008 // flooding, or too slow to read
	closeTooBig          = 1009 // frame over maxFrameBytes
	closeReplaced        = 4000 // a resume took over the session (a private-use code)
)

// Error codes carried by {"type":"error"} frames.
const (
	errBadJSON     = "bad_json"
	errUnknownType = "unknown_type"
	errEmpty       = "empty"
	errTooLong     = "too_long"
	errBadName     = "bad_name"
	errRateLimited = "rate_limited"
)

// user is a session's public identity on the wire.
type user struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

// inbound is any frame a client sends; which fields matter depends on Type.
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
// already encoded (see join).
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

// refusal is why a client's frame was refused; it goes back as an error frame.
type refusal struct {
	Code string `json:"code"`
	Text string `json:"error"`
}

// hub is the chat room: the http.Handler for GET /ws and everything the
// clients share.
type hub struct {
	log          *slog.Logger
	maxClients   int
	allowOrigins map[string]bool // lower-case "scheme://host[:port]"
	run          string          // this server run; every id carries it, and seq restarts with it
	// The timings of the same names, changeable by tests before serving.
	pingEvery, readIdle, writeWait, resumeWindow time.Duration

	admitted atomic.Int64   // connections past admission, including mid-handshake
	handlers sync.WaitGroup // one per upgraded connection, for shutdown

	mu       sync.Mutex           // guards the fields below, and every session's fields but id and secret
	clients  map[*client]struct{} // the connections in the room: one per live session
	sessions map[string]*session  // by id: the live sessions, and the ended ones that may resume
	ended    list.List            // the ended sessions, oldest first, at most maxEndedSessions
	byName   map[string]*session  // live sessions by foldName(name), to keep names unique
	bases    map[string]*nameBase // by foldName of a name asked for
	lastID   int64
	seq      int64
	history  [][]byte // encoded message frames, oldest first, at most historySize
	histJSON []byte   // history as one JSON array, built on the first join after a change
	joined   map[*session]bool
	left     map[*session]user // with the name it left under
	flushing bool              // a presence flush is scheduled
	pinging  bool              // a round of pings is scheduled
	closed   bool              // shutdown has begun: no joins, no frames
}

// session is one person in the room, across connections.
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

// joinRequest is GET /ws?name=NAME&resume=TOKEN&since=SEQ, each part optional.
type joinRequest struct {
	name   string // a display name for a new session
	resume string // a token, to continue a session
	since  int64  // the last seq the client shows, or -1
}

// parseJoin reads a join request; a since that is not a whole number from 0
// up counts as not given.
func parseJoin(q url.Values) joinRequest {
	req := joinRequest{name: q.Get("name"), resume: q.Get("resume"), since: -1}
	if n, err := strconv.ParseInt(q.Get("since"), 10, 64); err == nil && n >= 0 {
		req.since = n
	}
	return req
}

// join puts c in the room and queues its welcome, and reports false once
// shutdown has begun. If req.resume names a session still kept, c continues
// it: same id and name, and the messages after req.since. Otherwise c starts
// a new session under the name asked for (or a random one, with an error
// frame saying why). join runs before c's writer starts: the welcome is
// encoded outside the lock, then put in front of what reached c meanwhile.
func (h *hub) join(c *client, req joinRequest) bool {
	var bad *refusal
	name := randomName()
	if req.name != "" {
		if n, ref := cleanName(req.name); ref != nil {
			bad = ref
		} else {
			name = n
		}
	}
	secret := crand.Text()
	now := time.Now()

	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return false
	}
	h.forgetEndedLocked(now)
	s := h.resumableLocked(req.resume)
	resumed := s != nil
	switch {
	case !resumed:
		h.lastID++
		s = &session{id: h.run + "-" + strconv.FormatInt(h.lastID, 10), secret: secret}
		h.sessions[s.id] = s
		h.takeNameLocked(s, name, name)
		h.joined[s] = true
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
	s.client, c.s = c, s
	h.clients[c] = struct{}{}
	h.schedulePresenceLocked()
	if !h.pinging {
		h.pinging = true
		time.AfterFunc(h.pingEvery, h.pingAll)
	}
	users := []user{s.user()}
	for other := range h.clients {
		if len(users) == welcomeUsers {
			break
		}
		if other != c {
			users = append(users, other.s.user())
		}
	}
	var history []byte
	var missed int64
	if resumed && req.since >= 0 {
		history, missed = h.historySinceLocked(req.since)
	} else {
		if h.histJSON == nil {
			h.histJSON = jsonArray(h.history)
		}
		history = h.histJSON // replaced, never changed
	}
	w := welcome{"welcome", s.user(), len(h.clients), users, h.run, stamp(now), s.id + "." + s.secret, resumed, missed}
	h.mu.Unlock()

	// The history goes in already encoded: as a json.RawMessage it would be
	// validated again, 47 µs a join with a full history against 3 µs.
	head := encode(w)
	n := len(head) + len(`,"history":`) + len(history)
	frame := appendHeader(make([]byte, 0, 10+n), websocket.TextFrame, n)
	frame = append(frame, head[:len(head)-1]...) // all but the closing brace
	frame = append(append(append(frame, `,"history":`...), history...), '}')
	first := [][]byte{frame}
	if bad != nil && !resumed {
		first = append(first, textFrame(encodeRefusal(bad)))
	}
	c.out.putFirst(first...)
	return true
}

// historySinceLocked returns, as a JSON array, the kept messages with a seq
// above since, and how many messages above since are no longer kept. The
// caller holds h.mu.
func (h *hub) historySinceLocked(since int64) (history []byte, missed int64) {
	oldest := h.seq - int64(len(h.history)) + 1 // the seq of h.history[0]
	since = min(since, h.seq)
	from := max(since+1, oldest)
	return jsonArray(h.history[from-oldest:]), from - (since + 1)
}

func jsonArray(frames [][]byte) []byte {
	return append(append([]byte("["), bytes.Join(frames, []byte(","))...), ']')
}

// say broadcasts a message from c, already checked by decodeFrame.
func (h *hub) say(c *client, text string) {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.inRoomLocked(c) {
		return
	}
	h.seq++
	frame := encode(message{"message", h.seq, c.s.user(), text, stamp(now)})
	if len(h.history) == historySize {
		copy(h.history, h.history[1:])
		h.history = h.history[:historySize-1]
	}
	h.history = append(h.history, frame)
	h.histJSON = nil
	h.broadcastLocked(frame)
}

// inRoomLocked reports whether c is still in the room (not dropped, and the
// server not shutting down). The caller holds h.mu.
func (h *hub) inRoomLocked(c *client) bool {
	_, ok := h.clients[c]
	return ok && !h.closed
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

// reply queues a frame for c alone.
func (h *hub) reply(c *client, payload []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inRoomLocked(c) {
		h.offerLocked(c, textFrame(payload))
	}
}

// refuse tells c why its last frame was refused; the connection stays open.
func (h *hub) refuse(c *client, r *refusal) { h.reply(c, encodeRefusal(r)) }

func encodeRefusal(r *refusal) []byte {
	return encode(struct {
		Type string `json:"type"` // "error"
		*refusal
	}{"error", r})
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

// drop takes c out of the room, if it is still there, and has its writer
// close the connection with code.
func (h *hub) drop(c *client, code int, text string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dropLocked(c, code, text)
}

func (h *hub) dropLocked(c *client, code int, text string) {
	if _, ok := h.clients[c]; !ok {
		return
	}
	delete(h.clients, c)
	if s := c.s; s.client == c { // not replaced: the session leaves the room
		h.endLocked(s)
	}
	if code != closeNormal {
		h.log.Debug("dropping client", "client", c.s.id, "code", code, "reason", text)
	}
	c.out.close(appendClose(nil, code, text), code == closePolicyViolation || code == closeReplaced)
	// A client out of the room gets closeGrace for the writes still to come
	// (its backlog and the close frame) and for the one in progress: a
	// client that stopped reading must not hold its connection, or the
	// server's shutdown, for a whole writeWait.
	c.wire.stopBy(time.Now().Add(closeGrace))
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

// pingAll queues a ping for every client, and schedules the next round while
// anyone is in the room. One timer for the whole hub, rather than a ticker
// per client, keeps an idle connection cheap.
func (h *hub) pingAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || len(h.clients) == 0 {
		h.pinging = false
		return
	}
	for c := range h.clients {
		h.offerLocked(c, pingFrame)
	}
	time.AfterFunc(h.pingEvery, h.pingAll)
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

// ---------------------------------------------------------- a connection --

// client is one connection to the chat, and the session speaking through it.
type client struct {
	s    *session    // set by join, then fixed
	conn net.Conn    // the hijacked connection; closed by the client's own goroutine
	live *liveReader // reads conn, and owns its read deadline; set at upgrade
	wire *wire       // writes conn, and owns its write deadline; set at upgrade

	out        outbox        // frames for the writer; put only while holding hub.mu
	writerDone chan struct{} // closed when the writer goroutine exits
}

func newClient() *client {
	return &client{out: outbox{wake: make(chan struct{}, 1)}, writerDone: make(chan struct{})}
}

// ServeHTTP handles GET /ws. Every refusal happens before the upgrade, so it
// is a plain HTTP answer: 400 for a request that is not a WebSocket
// handshake, 403 for a cross-origin one, 503 when the room is full. (A
// handshake that arrives as the server stops is answered with close 1001.)
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
	c := newClient()
	req := parseJoin(r.URL.Query())
	h.handlers.Add(1) // before the hijack, while Shutdown still waits for this request
	started := false
	ws := websocket.Server{Handler: func(ws *websocket.Conn) {
		// Join, then serve from a goroutine of the connection's own: net/http's
		// goroutine ends, and with it the request's buffers and deep stack,
		// most of what an idle connection would otherwise hold.
		started = true
		joined := h.join(c, req)
		go func() {
			defer h.handlers.Done()
			defer h.admitted.Add(-1)
			defer c.conn.Close()
			h.serve(ws, c, joined)
		}()
	}}
	ws.ServeHTTP(hijacker{w, c, h.readIdle, h.writeWait}, r)
	if !started { // the handshake failed
		if c.conn != nil {
			c.conn.Close()
		}
		h.admitted.Add(-1)
		h.handlers.Done()
	}
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

// serve runs a client's reader: it is the only reader of ws. joined says
// whether join let c in (not once shutdown has begun). It returns once the
// writer has finished; the caller then closes the connection.
func (h *hub) serve(ws *websocket.Conn, c *client, joined bool) {
	ws.MaxPayloadBytes = maxFrameBytes
	if !joined { // never in the room, so bounded like a client leaving it
		c.wire.stopBy(time.Now().Add(closeGrace))
		c.wire.Write(appendClose(nil, closeGoingAway, "server shutting down"))
		return
	}
	log := h.log.With("client", c.s.id)
	log.Debug("joined", "remote", c.conn.RemoteAddr())
	go c.write()

	limit := newBucket(rateBurst, ratePerSecond)
	strikes := newBucket(floodStrikes, floodStrikes/floodWindow.Seconds())
	for {
		var in rawFrame
		// Once c is out of the room this goes on reading (and the hub
		// ignoring) what the peer sends, until its close frame or closeGrace.
		err := frameCodec.Receive(ws, &in)
		if errors.Is(err, websocket.ErrFrameTooLarge) {
			h.drop(c, closeTooBig, "frame over "+strconv.Itoa(maxFrameBytes)+" bytes")
			continue
		}
		if err != nil {
			log.Debug("read ended", "err", err)
			break
		}
		switch in.opcode {
		case websocket.TextFrame:
		case websocket.BinaryFrame:
			h.drop(c, closeUnsupported, "text frames only")
			continue
		default: // x/net passes reserved opcodes on as data
			h.drop(c, closeProtocolError, "reserved opcode "+strconv.Itoa(int(in.opcode)))
			continue
		}
		if now := time.Now(); !limit.take(now) {
			if !strikes.take(now) {
				h.drop(c, closePolicyViolation, "flooding")
				continue
			}
			h.refuse(c, &refusal{errRateLimited, "too many frames: at most " +
				strconv.Itoa(rateBurst) + " at once or " + strconv.Itoa(ratePerSecond) + " a second"})
			continue
		}
		if ref := h.handle(c, in.data); ref != nil {
			h.refuse(c, ref)
		}
	}
	h.drop(c, closeNormal, "")
	<-c.writerDone
	log.Debug("left")
}

// pong answers a client's {"type":"ping"}.
var pong = []byte(`{"type":"pong"}`)

// handle acts on one frame from c, or says why it refused it.
func (h *hub) handle(c *client, data []byte) *refusal {
	in, ref := decodeFrame(data)
	if ref != nil {
		return ref
	}
	switch in.Type {
	case "message":
		h.say(c, in.Text)
	case "rename":
		return h.rename(c, in.Name)
	case "ping":
		h.reply(c, pong)
	}
	return nil
}

// decodeFrame parses and checks a client frame. It refuses what is not a JSON
// object, an unknown type, and a message whose trimmed text is empty or over
// maxTextChars. Invalid UTF-8 is refused, so it can never be relayed.
func decodeFrame(data []byte) (inbound, *refusal) {
	var in inbound
	if !utf8.Valid(data) {
		return in, &refusal{errBadJSON, "frame is not valid UTF-8"}
	}
	if err := json.Unmarshal(data, &in); err != nil {
		return in, &refusal{errBadJSON, "frame is not a JSON object of the chat protocol: " + err.Error()}
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
		return in, &refusal{errUnknownType, fmt.Sprintf("unknown frame type %q: want message, rename or ping", in.Type)}
	}
	return in, nil
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

// write is c's writer goroutine, the only one that writes frames to c's
// connection: each time it wakes, the whole outbox in one write. Once the
// outbox is closed and its close frame sent, it gives the peer closeGrace to
// answer; if a write fails, the peer is gone or stuck, and the reader ends
// too. (writeBatch is its own function so that this goroutine's stack stays
// small between wake-ups: inlined, it cost 2 KB more per client.)
func (c *client) write() {
	defer close(c.writerDone)
	for range c.out.wake {
		closed, err := c.writeBatch()
		switch {
		case err != nil:
			c.live.closeAfter(0)
			return
		case closed:
			c.live.closeAfter(closeGrace)
			return
		}
	}
}

// writeBatch writes every frame in c's outbox in one write, and reports
// whether the last was the close frame.
func (c *client) writeBatch() (closed bool, err error) {
	frames, closed := c.out.take()
	bp := batchPool.Get().(*[]byte)
	buf := (*bp)[:0]
	for _, f := range frames {
		buf = append(buf, f...)
	}
	c.out.done(frames)
	if len(buf) > 0 {
		_, err = c.wire.Write(buf) // a close frame goes under the closeGrace dropLocked set
	}
	if cap(buf) <= maxPooledBatch {
		*bp = buf
		batchPool.Put(bp)
	}
	return closed, err
}

// batchPool holds the writers' batch buffers (up to maxPooledBatch bytes
// each), so that an idle client holds none and a busy one does not allocate.
// With a new buffer per batch and a new queue per take (see outbox.done),
// 5000 clients held 1.9 KB more each.
var batchPool = sync.Pool{New: func() any { return new([]byte) }}

const maxPooledBatch = 64 << 10

// outbox is a client's queue of frames, framed for the wire, waiting for its
// writer: the hub puts them in one at a time (messages, pings, replies), the
// writer takes all of them at once. A close frame is the last one in.
type outbox struct {
	mu     sync.Mutex // guards the fields below
	frames [][]byte   // at most sendQueueFrames, a close frame aside
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
// bound (a new client's welcome).
func (o *outbox) putFirst(frames ...[]byte) {
	o.mu.Lock()
	o.frames = append(frames, o.frames...)
	o.mu.Unlock()
	o.signal()
}

// close queues a close frame last; discard drops the frames queued before it
// (for a client too slow or hostile to deserve them).
func (o *outbox) close(frame []byte, discard bool) {
	o.mu.Lock()
	if discard {
		clear(o.frames)
		o.frames = o.frames[:0]
	}
	o.frames = append(o.frames, frame)
	o.closed = true
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

// ---------------------------------------------------------------- limits --

// bucket is a token bucket: it holds up to size tokens, refills at perSecond,
// and take takes one if there is one. A client's reader keeps two: one for
// its frames (the rate limit) and one for its refused frames (the flood
// limit). Only that reader uses them.
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

// ------------------------------------------------- what x/net leaves to us --
//
// A first reading may stop here. x/net/websocket does the handshake and the
// reading, and leaves us this:
//   - It writes one frame per system call, and its Close always sends 1000.
//     The writer frames its own batches, close codes included; server
//     frames are simple (unmasked, a two- to ten-byte header).
//   - It writes pongs from inside Read, on our writer's socket: both go
//     through the wire, which owns the write deadline.
//   - It swallows pongs, so liveReader pushes the read deadline forward on
//     any bytes from the peer, and a silent peer times out.

// hijacker hands x/net the hijacked connection, with small buffers, reading
// through a liveReader, writing through a wire, and not closed by x/net.
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
	hj.c.conn = conn
	hj.c.live = &liveReader{conn: conn, idle: hj.idle}
	hj.c.wire = &wire{conn: conn, wait: hj.writeWait}
	var r io.Reader = hj.c.live
	if n := brw.Reader.Buffered(); n > 0 { // bytes that came with the handshake
		early, _ := brw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(early)), r)
	}
	conn.SetReadDeadline(time.Now().Add(hj.idle)) // the first; from the first read on, the liveReader's alone
	// New small buffers, so that net/http's can go with its request. x/net
	// writes its handshake answer and its pongs through the wire.
	brw = bufio.NewReadWriter(bufio.NewReaderSize(r, connReadBufferBytes), bufio.NewWriterSize(hj.c.wire, connWriteBufferBytes))
	return keepOpen{conn}, brw, nil
}

// keepOpen is the connection as x/net sees it: x/net closes it when its
// handler returns, but the client's own goroutine serves on and closes it.
type keepOpen struct{ net.Conn }

func (keepOpen) Close() error { return nil }

// wire is the one path by which bytes reach a connection, and the owner of
// its write deadline. The deadline belongs to the socket, not to a write:
// when the writer moved it only for its own writes, x/net's pongs ran under
// a stale one and a client that pinged in a quiet room was cut off. So each
// write sets its own deadline as it starts, and mu keeps the pair whole.
// stopBy is the one other hand on it: the hub dropping a client and the
// broadcaster stopping streams end the write in progress, and bound every
// later one, so that a peer that stopped reading cannot hold up shutdown.
type wire struct {
	conn deadlineWriter
	wait time.Duration // how long a write may take, unless it says otherwise

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

// liveReader pushes the read deadline forward whenever bytes arrive, so that
// any traffic, the pongs x/net swallows included, proves the peer is there.
// Once closing, the deadline stays where closeAfter put it.
type liveReader struct {
	conn net.Conn
	idle time.Duration

	mu      sync.Mutex // orders deadline updates between Read and closeAfter
	closing bool
}

func (lr *liveReader) Read(p []byte) (int, error) {
	n, err := lr.conn.Read(p)
	if n > 0 {
		lr.mu.Lock()
		if !lr.closing {
			lr.conn.SetReadDeadline(time.Now().Add(lr.idle))
		}
		lr.mu.Unlock()
	}
	return n, err
}

// closeAfter stops pushing the deadline and gives the peer d to finish.
func (lr *liveReader) closeAfter(d time.Duration) {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	lr.closing = true
	lr.conn.SetReadDeadline(time.Now().Add(d))
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

// textFrame frames a JSON payload.
func textFrame(payload []byte) []byte {
	return append(appendHeader(make([]byte, 0, 10+len(payload)), websocket.TextFrame, len(payload)), payload...)
}

// pingFrame is the server's ping, shared by every client.
var pingFrame = appendHeader(nil, websocket.PingFrame, 0)

// appendClose appends a close frame with a status code and reason (RFC 6455,
// section 5.5.1). The reason must fit the 123 bytes a control frame allows.
func appendClose(b []byte, code int, reason string) []byte {
	b = binary.BigEndian.AppendUint16(appendHeader(b, websocket.CloseFrame, 2+len(reason)), uint16(code))
	return append(b, reason...)
}

// rawFrame is one received frame. x/net does not reassemble fragments: each
// is a rawFrame, continuations carrying the first one's opcode.
type rawFrame struct {
	opcode byte
	data   []byte
}

// frameCodec receives one frame as a rawFrame.
var frameCodec = websocket.Codec{Unmarshal: func(data []byte, opcode byte, v any) error {
	*v.(*rawFrame) = rawFrame{opcode, data}
	return nil
}}

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
