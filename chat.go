// Chat over WebSocket.
//
// Who owns what:
//   - The hub owns the set of clients, their names, the message sequence
//     number, the history and the pending presence changes, all under one
//     mutex (hub.mu).
//   - Each client has two goroutines. The reader (started by x/net's handler,
//     which then returns) is the only reader of the connection; it decodes
//     frames and calls into the hub. The writer is the only goroutine that
//     writes frames to the socket; it empties the client's bounded queue (its
//     outbox), taking the whole backlog at once.
//   - A broadcast encodes its frame once and, under hub.mu, puts the same
//     bytes in every outbox without blocking. A client whose outbox is full
//     is dropped, never waited for, and nothing touches a socket while hub.mu
//     is held. Putting under the lock is what keeps every client's view in
//     seq order. Lock order: hub.mu, then an outbox's own mutex.
//
// x/net/websocket does the handshake and the reading; the writer writes its
// own frames, for three reasons. x/net writes (and flushes) one frame per
// system call, and a writer that finds many frames queued should send them in
// one. Its Conn.Close always sends status 1000, and we need 1001 to 1009.
// And server frames are simple: unmasked, a two- to ten-byte header. Each
// batch goes out in a single conn.Write, which the connection's write lock
// keeps whole even beside the pongs x/net writes on its own.
//
// x/net also answers pings and swallows pongs inside Read, so we cannot see a
// pong arrive. Instead liveReader pushes the read deadline forward on any
// bytes from the peer, pongs included, and a peer that goes silent times out.
// And it returns ErrFrameTooLarge but keeps the connection; we close it with
// 1009.
package main

import (
	"bufio"
	"bytes"
	"context"
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
	// maxFrameBytes is the largest frame payload a client may send; a larger
	// frame closes the connection with 1009.
	maxFrameBytes = 8 << 10
	// maxTextChars bounds a message's text after trimming.
	maxTextChars = 2000
	// maxNameChars bounds a display name after trimming.
	maxNameChars = 32
	// historySize is how many recent messages a newcomer's welcome carries.
	historySize = 50
	// welcomeUsers bounds the users listed in a welcome, so that a welcome
	// stays small in a large room.
	welcomeUsers = 100
	// presenceEvery is the shortest time between two presence frames: joins
	// and leaves inside it are coalesced into one frame.
	presenceEvery = 250 * time.Millisecond
	// presenceNames bounds each of a presence frame's joined and left lists;
	// joinedCount and leftCount carry the totals.
	presenceNames = 20
	// sendQueueFrames bounds each client's outbound queue, in frames. A
	// client whose queue is full when a frame arrives is dropped. Frames are
	// shared by every client, so a queued frame costs one slice header; the
	// queue grows only as needed.
	sendQueueFrames = 256
	// writeWait bounds a write to a client: a write that has not finished
	// writeWait/2 to writeWait after the last deadline update fails.
	writeWait = 10 * time.Second
	// pingEvery is how often the server pings every client (one timer for
	// the room). Must be well under readIdle, so that a live peer's pong
	// arrives in time.
	pingEvery = 30 * time.Second
	// readIdle is how long a client may send nothing at all (no frame, no
	// pong) before it is taken for gone. With pingEvery, a vanished peer is
	// removed within 75 s.
	readIdle = 75 * time.Second
	// closeGrace bounds the close frame's write, and then how long the server
	// reads (and discards) while waiting for the peer's close frame. A stuck
	// client costs it twice at shutdown: well inside shutdownTimeout.
	closeGrace = time.Second
	// connReadBufferBytes and connWriteBufferBytes size the buffers x/net
	// reads frames through and writes its handshake and pongs through. Small
	// on purpose: a payload longer than the read buffer bypasses it, and the
	// writer sends its batches past the write buffer. net/http's 4 KiB pair
	// would be most of an idle connection's memory. The write buffer must
	// hold a whole control frame (127 bytes), so that each pong x/net writes
	// goes out in one conn.Write and cannot interleave with a batch.
	connReadBufferBytes  = 512
	connWriteBufferBytes = 256
	// rateBurst and ratePerSecond limit frames from one client: a burst of
	// rateBurst, refilled at ratePerSecond. Frames over it are refused.
	rateBurst     = 10
	ratePerSecond = 5
	// floodStrikes is how many refused frames in a row close the connection
	// with 1008.
	floodStrikes = 30
)

// WebSocket close codes (RFC 6455, section 7.4.1).
const (
	closeNormal          = 1000
	closeGoingAway       = 1001 // server shutting down
	closeProtocolError   = 1002 // a frame with a reserved opcode
	closeUnsupported     = 1003 // a binary frame: the protocol is JSON text
	closePolicyViolation = 1008 // flooding, or too slow to read
	closeTooBig          = 1009 // frame over maxFrameBytes
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

// user is a client's public identity on the wire.
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
	run          string          // identifies this server run; seq restarts with it
	pingEvery    time.Duration   // pingEvery, changeable by tests
	readIdle     time.Duration   // readIdle, changeable by tests

	admitted atomic.Int64   // connections past admission, including mid-handshake
	handlers sync.WaitGroup // one per upgraded connection, for shutdown
	nextID   atomic.Int64

	mu       sync.Mutex // guards the fields below, and every client's name
	clients  map[*client]struct{}
	byName   map[string]*client // by foldName(name), to keep names unique
	seq      int64
	history  [][]byte // encoded message frames, oldest first, at most historySize
	histJSON []byte   // history as one JSON array, built on the first join after a change
	joined   map[*client]bool
	left     []user
	leftN    int
	flushing bool // a presence flush is scheduled
	pinging  bool // a round of pings is scheduled
	closed   bool // shutdown has begun: no joins, no frames
}

func newHub(log *slog.Logger, maxClients int, allowOrigins []string) *hub {
	h := &hub{
		log:          log,
		maxClients:   maxClients,
		allowOrigins: make(map[string]bool),
		run:          strconv.FormatUint(rand.Uint64(), 36),
		pingEvery:    pingEvery,
		readIdle:     readIdle,
		clients:      make(map[*client]struct{}),
		byName:       make(map[string]*client),
		joined:       make(map[*client]bool),
		left:         []user{},
	}
	for _, o := range allowOrigins {
		h.allowOrigins[strings.ToLower(strings.TrimSuffix(o, "/"))] = true
	}
	return h
}

// client is one chat connection.
type client struct {
	id   string
	conn net.Conn    // the hijacked connection, for deadlines
	live *liveReader // set at upgrade

	name       string        // guarded by hub.mu
	out        outbox        // frames for the writer; put only while holding hub.mu
	writeBy    time.Time     // the write deadline set last; the writer's alone
	writerDone chan struct{} // closed when the writer goroutine exits
}

// online reports how many clients are in the room.
func (h *hub) online() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.clients)
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
	c := newClient("u" + strconv.FormatInt(h.nextID.Add(1), 10))
	name := r.URL.Query().Get("name")
	h.handlers.Add(1) // before the hijack, while Shutdown still waits for this request
	started := false
	ws := websocket.Server{Handler: func(ws *websocket.Conn) {
		// Serve in a goroutine of the connection's own and return: net/http's
		// goroutine for this request then ends, and with it the request's
		// buffers and the stack that parsing it grew, most of the memory an
		// idle connection would otherwise hold.
		started = true
		go func() {
			defer h.handlers.Done()
			defer h.admitted.Add(-1)
			defer c.conn.Close()
			h.serve(ws, c, name)
		}()
	}}
	ws.ServeHTTP(hijacker{w, c, h.readIdle}, r)
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

func newClient(id string) *client {
	return &client{id: id, out: outbox{wake: make(chan struct{}, 1)}, writerDone: make(chan struct{})}
}

// outbox is a client's queue of frames waiting for its writer: the hub puts
// frames in one at a time, the writer takes all of them at once. Closing it
// tells the writer to send a close frame and stop.
type outbox struct {
	mu     sync.Mutex // guards the fields below
	frames [][]byte   // at most sendQueueFrames
	spare  [][]byte   // the writer's last batch, emptied, for reuse
	ping   bool       // a ping is due
	closed bool
	code   int    // close code, once closed
	reason string // close reason, once closed

	wake chan struct{} // one slot: a signal that frames arrived, a ping is due or the box closed
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

// pingDue asks the writer to send a ping.
func (o *outbox) pingDue() {
	o.mu.Lock()
	o.ping = true
	o.mu.Unlock()
	o.signal()
}

// close closes the box with a close code; discard drops the frames still
// queued (for a client too slow or hostile to deserve them).
func (o *outbox) close(code int, reason string, discard bool) {
	o.mu.Lock()
	o.closed, o.code, o.reason = true, code, reason
	if discard {
		clear(o.frames)
		o.frames = o.frames[:0]
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

// take returns every queued frame, whether a ping is due, and the close code
// if the box is closed. The writer gives the frames back with done once
// written.
func (o *outbox) take() (frames [][]byte, ping, closed bool, code int, reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	frames, o.frames, o.spare = o.frames, o.spare, nil
	ping, o.ping = o.ping, false
	return frames, ping, o.closed, o.code, o.reason
}

// done returns a written batch for reuse, so a busy client's queue does not
// allocate.
func (o *outbox) done(frames [][]byte) {
	clear(frames) // let the frames be collected
	o.mu.Lock()
	o.spare = frames[:0]
	o.mu.Unlock()
}

// hijacker hands x/net/websocket the hijacked connection with small buffers,
// reading through a liveReader and not closed by x/net, and records the
// connection in the client.
type hijacker struct {
	http.ResponseWriter
	c    *client
	idle time.Duration
}

func (hj hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(hj.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	hj.c.conn = conn
	hj.c.live = &liveReader{conn: conn, idle: hj.idle}
	var r io.Reader = hj.c.live
	if n := brw.Reader.Buffered(); n > 0 { // bytes that came with the handshake
		early, _ := brw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(early)), r)
	}
	conn.SetReadDeadline(time.Now().Add(hj.idle))
	// New small buffers, so that net/http's can go with its request.
	brw = bufio.NewReadWriter(bufio.NewReaderSize(r, connReadBufferBytes), bufio.NewWriterSize(conn, connWriteBufferBytes))
	return keepOpen{conn}, brw, nil
}

// keepOpen is the connection as x/net sees it: x/net closes its connection
// when its handler returns, but the client's own goroutine serves on after
// that and closes c.conn when it is done.
type keepOpen struct{ net.Conn }

func (keepOpen) Close() error { return nil }

// liveReader reads from the connection and pushes its read deadline forward
// whenever bytes arrive, so that any traffic from the peer, including the
// pongs x/net/websocket swallows, proves it is still there. Once the
// connection is closing the deadline stays where closeAfter put it.
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

// isClosing reports whether closeAfter has been called.
func (lr *liveReader) isClosing() bool {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.closing
}

// serve runs a client's reader: it is the only reader of ws. It returns once
// the writer has finished; the caller then closes the connection.
func (h *hub) serve(ws *websocket.Conn, c *client, wantName string) {
	ws.MaxPayloadBytes = maxFrameBytes
	log := h.log.With("client", c.id)
	if !h.join(c, wantName) {
		c.conn.SetWriteDeadline(time.Now().Add(closeGrace))
		c.conn.Write(appendClose(nil, closeGoingAway, "server shutting down"))
		return
	}
	log.Debug("joined", "remote", c.conn.RemoteAddr())
	go c.write()

	limit := bucket{tokens: rateBurst, last: time.Now()}
	strikes := 0
	for {
		var in rawFrame
		err := frameCodec.Receive(ws, &in)
		if c.live.isClosing() {
			if err == nil || errors.Is(err, websocket.ErrFrameTooLarge) {
				continue // drain until the peer's close frame or closeGrace
			}
			break
		}
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
		if !limit.allow(time.Now()) {
			if strikes++; strikes >= floodStrikes {
				h.drop(c, closePolicyViolation, "flooding")
				continue
			}
			h.refuse(c, &refusal{errRateLimited, "too many frames: at most " +
				strconv.Itoa(rateBurst) + " at once or " + strconv.Itoa(ratePerSecond) + " a second"})
			continue
		}
		strikes = 0
		if ref := h.handle(c, in.data); ref != nil {
			h.refuse(c, ref)
		}
	}
	h.drop(c, closeNormal, "")
	<-c.writerDone
	log.Debug("left")
}

// pongFrame answers a client's ping.
var pongFrame = []byte(`{"type":"pong"}`)

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
		h.reply(c, pongFrame)
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

// foldName is the key under which names must be unique: case does not
// tell two users apart.
func foldName(s string) string { return strings.ToLower(s) }

// uniqueNameLocked returns name, or name with a "-2", "-3"... suffix, such that
// no other client online has it. The caller holds h.mu.
func (h *hub) uniqueNameLocked(name string, self *client) string {
	taken := func(n string) bool {
		other, ok := h.byName[foldName(n)]
		return ok && other != self
	}
	if !taken(name) {
		return name
	}
	for i := 2; ; i++ {
		suffix := "-" + strconv.Itoa(i)
		base := []rune(name)
		if max := maxNameChars - len(suffix); len(base) > max {
			base = base[:max]
		}
		if n := strings.TrimSpace(string(base)) + suffix; !taken(n) {
			return n
		}
	}
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

// join adds c to the room under a unique name and queues its welcome. A name
// that cannot be used is replaced by a random one, with an error frame after
// the welcome saying why. It reports false once shutdown has begun.
//
// join must run before c's writer starts: the welcome is encoded after the
// lock is released (in a storm of joins, encoding it under the lock was most
// of what everyone else waited for) and then put in front of whatever
// broadcasts reached c's outbox meanwhile.
func (h *hub) join(c *client, want string) bool {
	var bad *refusal
	name := randomName()
	if want != "" {
		if n, ref := cleanName(want); ref != nil {
			bad = ref
		} else {
			name = n
		}
	}
	now := time.Now()

	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return false
	}
	c.name = h.uniqueNameLocked(name, c)
	h.clients[c] = struct{}{}
	h.byName[foldName(c.name)] = c
	h.joined[c] = true
	h.schedulePresenceLocked()
	if !h.pinging {
		h.pinging = true
		time.AfterFunc(h.pingEvery, h.pingAll)
	}
	users := []user{{c.id, c.name}}
	for other := range h.clients {
		if len(users) == welcomeUsers {
			break
		}
		if other != c {
			users = append(users, user{other.id, other.name})
		}
	}
	if h.histJSON == nil {
		h.histJSON = append(append([]byte("["), bytes.Join(h.history, []byte(","))...), ']')
	}
	history, online := h.histJSON, len(h.clients) // histJSON is replaced, never changed
	h.mu.Unlock()

	head := encode(struct {
		Type   string `json:"type"` // "welcome"
		You    user   `json:"you"`
		Online int    `json:"online"`
		Users  []user `json:"users"`
		Run    string `json:"run"`
		Time   string `json:"time"`
	}{"welcome", users[0], online, users, h.run, stamp(now)})
	// The history goes in already encoded: marshalling it as json.RawMessage
	// would re-validate every message in it on every join.
	welcome := make([]byte, 0, len(head)+len(history)+len(`,"history":`))
	welcome = append(welcome, head[:len(head)-1]...) // all but the closing brace
	welcome = append(append(append(welcome, `,"history":`...), history...), '}')
	first := [][]byte{welcome}
	if bad != nil {
		first = append(first, encodeRefusal(bad))
	}
	c.out.putFirst(first...)
	return true
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
	frame := encode(message{"message", h.seq, user{c.id, c.name}, text, stamp(now)})
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
	if !h.inRoomLocked(c) || name == c.name {
		return nil
	}
	old := c.name
	delete(h.byName, foldName(old))
	c.name = h.uniqueNameLocked(name, c)
	h.byName[foldName(c.name)] = c
	h.broadcastLocked(encode(struct {
		Type string `json:"type"` // "rename"
		User user   `json:"user"`
		Old  string `json:"old"`
		Time string `json:"time"`
	}{"rename", user{c.id, c.name}, old, stamp(now)}))
	return nil
}

// reply queues frame for c alone.
func (h *hub) reply(c *client, frame []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inRoomLocked(c) {
		h.offerLocked(c, frame)
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

// broadcastLocked offers frame to every client. The caller holds h.mu.
func (h *hub) broadcastLocked(frame []byte) {
	for c := range h.clients {
		h.offerLocked(c, frame)
	}
}

// offerLocked queues frame for c without blocking; if c's outbox is full, c
// is too slow to keep up and is dropped. The caller holds h.mu.
func (h *hub) offerLocked(c *client, frame []byte) {
	if !c.out.put(frame) {
		h.dropLocked(c, closePolicyViolation, "too slow: outbound queue full")
	}
}

// drop removes c from the room, if it is still there, and has its writer
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
	if h.byName[foldName(c.name)] == c {
		delete(h.byName, foldName(c.name))
	}
	if h.joined[c] {
		delete(h.joined, c) // joined and left inside one window: in neither list
	} else if !h.closed {
		if len(h.left) < presenceNames {
			h.left = append(h.left, user{c.id, c.name})
		}
		h.leftN++
		h.schedulePresenceLocked()
	}
	if code != closeNormal {
		h.log.Debug("dropping client", "client", c.id, "code", code, "reason", text)
	}
	c.out.close(code, text, code == closePolicyViolation)
}

// pingAll asks every client's writer for a ping, and schedules the next
// round while anyone is in the room. One timer for the whole hub, rather
// than a ticker per client, keeps an idle connection cheap.
func (h *hub) pingAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || len(h.clients) == 0 {
		h.pinging = false
		return
	}
	for c := range h.clients {
		c.out.pingDue()
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
	if h.closed || len(h.joined) == 0 && h.leftN == 0 {
		return
	}
	joined := make([]user, 0, min(len(h.joined), presenceNames))
	for c := range h.joined {
		if len(joined) == presenceNames {
			break
		}
		joined = append(joined, user{c.id, c.name})
	}
	frame := encode(struct {
		Type        string `json:"type"` // "presence"
		Online      int    `json:"online"`
		Joined      []user `json:"joined"`
		Left        []user `json:"left"`
		JoinedCount int    `json:"joinedCount"`
		LeftCount   int    `json:"leftCount"`
		Time        string `json:"time"`
	}{"presence", len(h.clients), joined, h.left, len(h.joined), h.leftN, stamp(now)})
	clear(h.joined)
	h.left, h.leftN = []user{}, 0
	h.broadcastLocked(frame)
}

// write is c's writer goroutine, the only goroutine that writes frames to
// c's connection. Each time it wakes it takes everything in the outbox (and
// a ping, if one is due) and sends it in one write. Once the outbox is
// closed it adds a close frame with the hub's code, then gives the peer
// closeGrace to answer. If a write fails, the peer is gone or stuck: it ends
// the reader too.
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

// writeBatch writes every frame in c's outbox in one write, with a ping if
// one is due and a close frame if the outbox is closed.
func (c *client) writeBatch() (closed bool, err error) {
	frames, ping, closed, code, reason := c.out.take()
	bp := batchPool.Get().(*[]byte)
	buf := (*bp)[:0]
	for _, f := range frames {
		buf = appendFrame(buf, websocket.TextFrame, f)
	}
	c.out.done(frames)
	if ping {
		buf = appendFrame(buf, websocket.PingFrame, nil)
	}
	if closed {
		buf = appendClose(buf, code, reason)
		c.conn.SetWriteDeadline(time.Now().Add(closeGrace))
	} else if now := time.Now(); c.writeBy.Sub(now) < writeWait/2 {
		// Refreshed when half used up, not before every write: a deadline
		// costs a timer update, and most writes finish in microseconds.
		c.writeBy = now.Add(writeWait)
		c.conn.SetWriteDeadline(c.writeBy)
	}
	if len(buf) > 0 {
		_, err = c.conn.Write(buf)
	}
	if cap(buf) <= maxPooledBatch {
		*bp = buf
		batchPool.Put(bp)
	}
	return closed, err
}

// maxPooledBatch is the largest batch buffer, in bytes, kept for reuse; a
// larger one (a long backlog of long messages) is left to the collector.
const maxPooledBatch = 64 << 10

// batchPool holds the writers' batch buffers, so that an idle client holds none.
var batchPool = sync.Pool{New: func() any { return new([]byte) }}

// appendFrame appends one server frame (RFC 6455, section 5.2): final, not
// masked, with the shortest length encoding.
func appendFrame(b []byte, opcode byte, payload []byte) []byte {
	b = append(b, 0x80|opcode)
	switch n := len(payload); {
	case n < 126:
		b = append(b, byte(n))
	case n < 1<<16:
		b = binary.BigEndian.AppendUint16(append(b, 126), uint16(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, 127), uint64(n))
	}
	return append(b, payload...)
}

// appendClose appends a close frame with a status code and reason (RFC 6455,
// section 5.5.1). The reason must fit the 123 bytes a control frame allows.
func appendClose(b []byte, code int, reason string) []byte {
	payload := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(reason)), uint16(code))
	return appendFrame(b, websocket.CloseFrame, append(payload, reason...))
}

// rawFrame is one received frame: its opcode and payload. A fragmented
// message arrives as one rawFrame per fragment, continuations carrying the
// first fragment's opcode (x/net does not reassemble them).
type rawFrame struct {
	opcode byte
	data   []byte
}

// frameCodec receives one frame as a rawFrame.
var frameCodec = websocket.Codec{Unmarshal: func(data []byte, opcode byte, v any) error {
	*v.(*rawFrame) = rawFrame{opcode, data}
	return nil
}}

// shutdown closes every client with 1001 and refuses new ones.
func (h *hub) shutdown() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for c := range h.clients {
		h.dropLocked(c, closeGoingAway, "server shutting down")
	}
}

// wait blocks until every connection handler has returned, or ctx is done.
func (h *hub) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		h.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("chat connections still open: %w", ctx.Err())
	}
}

// bucket is a token-bucket rate limiter: it holds up to rateBurst tokens,
// refills at ratePerSecond, and each frame takes one. Only the client's
// reader uses it.
type bucket struct {
	tokens float64
	last   time.Time
}

func (b *bucket) allow(now time.Time) bool {
	b.tokens = min(rateBurst, b.tokens+now.Sub(b.last).Seconds()*ratePerSecond)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// encode marshals a frame. Every frame is a fixed struct of strings and
// numbers, so marshalling cannot fail.
func encode(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic("chat: encoding frame: " + err.Error())
	}
	return b
}

// stamp formats t as the protocol's times are: RFC 3339, UTC, milliseconds.
func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }
