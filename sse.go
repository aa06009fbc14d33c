// Server stats over Server-Sent Events.
//
// The wire protocol of GET /events (WHATWG HTML, "Server-sent events"):
//
//  1. The server answers 200 with Content-Type: text/event-stream,
//     Cache-Control: no-cache and X-Accel-Buffering: no (so a proxy such as
//     nginx passes each event on at once instead of buffering the stream).
//
//  2. It writes "retry: 2000", telling the browser to wait 2 s before
//     reconnecting, then the latest snapshot, at once.
//
//  3. Then, once a second, one event:
//
//     id: 42
//     event: stats
//     data: {"time":"...","host":{...},"memory":{...},...}
//     (blank line)
//
//  4. If no event has gone out for 15 s, it writes a comment line
//     (": keep-alive") so that idle proxies keep the stream open.
//
//  5. The stream ends when the client goes or the server shuts down; the
//     browser's EventSource then reconnects by itself.
//
// The fan-out: one sampler goroutine reads the system and encodes the event
// once per tick, then offers the same bytes to every subscriber's one-slot
// channel without blocking; a subscriber whose slot is still full (it is
// writing one tick and holds the next) skips this one, and slows nobody.
// The sampler runs only while someone listens.
//
// Over HTTP/2 (with -tls-cert) a stream is one of many on a connection and
// stays with net/http; over HTTP/1.1 it leaves net/http once its request is
// read (the hijack path, below). Either way its writes go through an
// eventStream, which owns the write deadline.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	osuser "os/user"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"time"
)

// Stats stream timing.
const (
	// sampleEvery is the time between two snapshots.
	sampleEvery = time.Second
	// sseRetry is the reconnect delay the stream asks browsers for.
	sseRetry = 2 * time.Second
	// sseKeepAlive is the longest a stream stays silent before a comment line.
	sseKeepAlive = 15 * time.Second
)

// tick is one sample, encoded once and shared read-only by every subscriber.
type tick struct {
	json  []byte // the snapshot and a newline, for GET /stats
	event []byte // the same, framed as an SSE event, for GET /events
}

// formatEvent frames data as one SSE event named "stats". data must be one
// line, as encoding/json's output is.
func formatEvent(id uint64, data []byte) []byte {
	return fmt.Appendf(nil, "id: %d\nevent: stats\ndata: %s\n\n", id, data)
}

// broadcaster runs the sampler and fans its ticks out to subscribers.
type broadcaster struct {
	log         *slog.Logger
	fsys        fs.FS      // the root file system, where /proc and /sys are read
	chatClients func() int // how many chat clients are online
	started     time.Time  // process start, for process.uptimeSeconds
	t           timings
	maxStreams  int // -max-streams

	// streams counts the open event streams, for shutdown to wait on. Its
	// Add is subscribe's alone, under mu and only while not closed: once
	// shutdown has set closed, no Add can race wait's Wait.
	streams sync.WaitGroup

	mu      sync.Mutex                  // guards the fields below, and every send on or close of a subscriber channel
	subs    map[chan *tick]*eventStream // each with its stream (nil for GET /stats)
	open    int                         // event streams subscribed (what streams counts): clients.sse, at most maxStreams
	latest  *tick                       // the last tick, while the sampler runs
	running bool
	closed  bool
	lastID  uint64 // the last tick's id; ids go on increasing across sampler runs

	// Owned by the sampler goroutine. One run stops (in publish, or restart
	// after a panic) before the next starts (in subscribe or restart), all under mu.
	// info is read on the first run, not at start: a process may be put in its
	// cgroup after it starts (TestRealCgroupLimitIsShown). It does not change after.
	info *hostInfo
	cpu  cpuTimes // the last CPU sample, kept across runs: a run's first tick covers the pause before it
}

func newBroadcaster(log *slog.Logger, fsys fs.FS, chatClients func() int, cfg config) *broadcaster {
	return &broadcaster{
		log:         log,
		fsys:        fsys,
		chatClients: chatClients,
		started:     time.Now(),
		t:           cfg.timings,
		maxStreams:  cfg.maxStreams,
		subs:        make(map[chan *tick]*eventStream),
	}
}

// subscribe returns a channel that receives the latest tick at once (if any)
// and then every tick it is ready for; it starts the sampler if none runs.
// A stream subscribes with its eventStream, and counts in b.open and
// b.streams until it unsubscribes. subscribe returns nil once shutdown has
// begun, and for a stream while maxStreams are open.
func (b *broadcaster) subscribe(out *eventStream) chan *tick {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || out != nil && b.open >= b.maxStreams {
		return nil
	}
	sub := make(chan *tick, 1)
	b.subs[sub] = out
	if out != nil {
		b.open++
		b.streams.Add(1)
	}
	if b.latest != nil {
		sub <- b.latest
	}
	if !b.running {
		b.running = true
		go b.sample()
	}
	return sub
}

// unsubscribe removes sub; the sampler stops at its next tick if sub was the last.
func (b *broadcaster) unsubscribe(sub chan *tick, out *eventStream) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[sub]; ok {
		delete(b.subs, sub)
		close(sub)
	}
	if out != nil {
		b.open--
		b.streams.Done()
	}
}

// shutdown ends every stream and stops the sampler. A stream blocked in a
// write (its reader stuck) gets closeGrace to finish it. A second call finds
// no subscriber left: subscribe takes none once closed is set.
func (b *broadcaster) shutdown() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true // the sampler stops at its next tick
	for sub, out := range b.subs {
		delete(b.subs, sub)
		close(sub)
		if out != nil {
			out.stop(b.t.closeGrace) // while the stream is subscribed, so while its handler runs
		}
	}
}

// sample is the sampler goroutine: it reads the system once per tick and
// publishes the result, until a tick finds no subscriber or shutdown begins.
// A panic ends it, logged, and restart sees to the next tick.
func (b *broadcaster) sample() {
	defer recoverTo(b.log, "stats sampler", b.restart)
	t := time.NewTicker(b.t.sample)
	defer t.Stop()
	for {
		data, err := json.Marshal(b.snapshot())
		if err != nil {
			panic("stats: encoding snapshot: " + err.Error()) // plain numbers and strings only
		}
		if !b.publish(data) {
			return
		}
		<-t.C
	}
}

// restart follows a sampler that panicked. Its tick is lost; if anyone still
// listens, a new sampler takes the next one, so that no stream, and no
// GET /stats waiting for a first tick, waits for ever. (A tick later, not at
// once: a sampler that always panics costs a log line a tick, not a busy loop.)
func (b *broadcaster) restart() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.running = len(b.subs) > 0 && !b.closed
	if b.running {
		time.AfterFunc(b.t.sample, b.sample)
	} else {
		b.latest = nil
	}
}

// publish offers one tick to every subscriber. A subscriber still writing
// an earlier tick finds this one in its slot when it comes back, in place
// of any it skipped: the newest wins. publish reports false, marking the
// sampler stopped, when there is nobody left.
func (b *broadcaster) publish(data []byte) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.subs) == 0 || b.closed {
		b.running, b.latest = false, nil
		return false
	}
	b.lastID++
	b.latest = &tick{json: append(data, '\n'), event: formatEvent(b.lastID, data)} // data is the sampler's, not yet shared
	for sub := range b.subs {
		select {
		case <-sub: // a tick it has not taken: replaced
		default:
		}
		sub <- b.latest // room for it: every send is made under b.mu
	}
	return true
}

// retryLine is the stream's first line: how long a browser waits before reconnecting.
var retryLine = "retry: " + strconv.FormatInt(sseRetry.Milliseconds(), 10) + "\n\n"

// serveEvents serves GET /events: the stats stream, through net/http. Over
// HTTP/1.1 the stream leaves net/http instead (serveHijacked, below).
func (b *broadcaster) serveEvents(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength != 0 { // nothing would read it, for as long as the stream lasts
		http.Error(w, "GET /events takes no body", http.StatusBadRequest)
		return
	}
	if r.ProtoMajor == 1 {
		b.serveHijacked(w)
		return
	}
	out := &eventStream{conn: flushingResponse{w, http.NewResponseController(w)}}
	sub := b.subscribe(out)
	if sub == nil {
		http.Error(w, "too many event streams, or shutting down", http.StatusServiceUnavailable)
		return
	}
	defer b.unsubscribe(sub, out)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	err := b.stream(out, sub, []byte(retryLine), r.Context().Done())
	b.log.Debug("stream closed", "remote", r.RemoteAddr, "err", err)
}

// flushingResponse is what an HTTP/2 stream writes to: each write is flushed
// at once, and the write deadline is the stream's own, not the connection's.
// net/http hands each SetWriteDeadline to the connection's goroutine, which
// owns the stream's timer, so the handler's goroutine and shutdown's may
// both call it while the handler runs (after, it would panic: see stop).
type flushingResponse struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (f flushingResponse) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err == nil {
		err = f.rc.Flush()
	}
	return n, err
}

func (f flushingResponse) SetWriteDeadline(t time.Time) error { return f.rc.SetWriteDeadline(t) }

// keepAliveLine is the comment a stream sends after sseKeepAlive of silence.
var keepAliveLine = []byte(": keep-alive\n\n")

// stream writes first, then events from sub, until sub is closed (shutdown),
// a write fails or blocks past sseWriteTimeout, or gone is closed. A hijacked
// stream has no gone: nothing reads its connection, so a client that left is
// noticed at the next write or the one after.
func (b *broadcaster) stream(out *eventStream, sub chan *tick, first []byte, gone <-chan struct{}) error {
	if err := out.write(first, b.t.write); err != nil {
		return err
	}
	quiet := time.NewTimer(b.t.keepAlive)
	defer quiet.Stop()
	for {
		var p []byte
		select {
		case t, ok := <-sub:
			if !ok {
				return nil // shutting down
			}
			p = t.event
		case <-quiet.C:
			p = keepAliveLine
		case <-gone:
			return context.Canceled
		}
		if err := out.write(p, b.t.write); err != nil {
			return err
		}
		quiet.Reset(b.t.keepAlive)
	}
}

// eventStream is one stream's connection. The stream's goroutine alone
// writes to it. It owns the write deadline, which two goroutines set: the
// stream's, to the write timeout before each write (over HTTP/2, the
// deadline net/http set from the server's WriteTimeout would otherwise end
// the stream), and shutdown's, once, to closeGrace. mu orders them, and once
// shutdown has set stopped the stream no longer moves the deadline: a write
// in progress at shutdown, and any begun after it, ends within closeGrace
// (TestShutdownEndsAStreamBlockedInAWrite).
type eventStream struct {
	conn interface { // a hijacked net.Conn (HTTP/1.1), or a flushingResponse (HTTP/2)
		io.Writer
		SetWriteDeadline(time.Time) error
	}

	mu      sync.Mutex // held for each SetWriteDeadline, and guards stopped
	stopped bool       // shutdown has set the last deadline
}

// write writes p within timeout, or within the bound stop set. Between
// writes there is no deadline: over HTTP/2 a deadline is a timer that
// resets the stream when it fires, even with no write under way, and a
// stream may be silent for sseKeepAlive (TestSilentHTTP2StreamGetsItsKeepAlive).
func (s *eventStream) write(p []byte, timeout time.Duration) error {
	s.deadline(time.Now().Add(timeout))
	_, err := s.conn.Write(p)
	s.deadline(time.Time{})
	return err
}

// deadline sets the write deadline, unless stop has set the last one.
func (s *eventStream) deadline(t time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.stopped {
		s.conn.SetWriteDeadline(t)
	}
}

// stop bounds the write in progress, if any, and every later one, by
// grace from now. The broadcaster calls it only for a stream still
// subscribed, under its mu: a stream unsubscribes before its handler
// returns, and net/http's HTTP/2 SetWriteDeadline panics after that.
func (s *eventStream) stop(grace time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped = true
	s.conn.SetWriteDeadline(time.Now().Add(grace))
}

// serveStats serves GET /stats: the latest snapshot as JSON. When no sampler
// runs, it starts one and waits for its first tick.
func (b *broadcaster) serveStats(w http.ResponseWriter, r *http.Request) {
	sub := b.subscribe(nil)
	if sub != nil {
		defer b.unsubscribe(sub, nil)
		select {
		case t, ok := <-sub:
			if ok {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Cache-Control", "no-store")
				w.Write(t.json)
				return
			}
		case <-r.Context().Done():
			return // the client went
		}
	}
	http.Error(w, "no stats: server shutting down", http.StatusServiceUnavailable)
}

// ------------------------------------------------ the HTTP/1.1 hijack path --
//
// Why this exists: memory. Served through net/http, a stream keeps the
// request's buffers, its background reader and a deep handler stack for its
// whole life, 27 KB a subscriber; taken out of net/http once its request is
// read, 8 KB (BenchmarkCapacitySSE's KB-rss/subscriber, at 5000 subscribers).
// A first reading may skip it: serveEvents shows the idea.

// streamReadBuffer is the receive buffer, in bytes, of a hijacked stream's
// connection. Nothing reads it, so whatever a client sends after its request
// stays in the kernel: with the default buffer about 127 KB a stream. Linux
// doubles the value, and still takes one segment when the buffer is full
// (on loopback up to half the window offered at the handshake): a stream
// holds at most 32 KB (TestUploadingStreamHoldsAtMost32KB).
const streamReadBuffer = 4 << 10

// eventStreamHeader answers GET /events over HTTP/1.1, written by hand once
// the connection has left net/http, with the stream's first line. The stream
// ends with the connection. Every stream writes these same bytes.
var eventStreamHeader = []byte("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n" +
	"X-Accel-Buffering: no\r\nConnection: close\r\n\r\n" + retryLine)

// serveHijacked takes the connection from net/http, answers with
// eventStreamHeader, and streams from a goroutine of its own, then returns.
func (b *broadcaster) serveHijacked(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "cannot stream: "+err.Error(), http.StatusInternalServerError)
		return
	}
	if tcp := tcpBeneath(conn); tcp != nil {
		tcp.SetReadBuffer(streamReadBuffer)
	}
	out := &eventStream{conn: conn}
	sub := b.subscribe(out)
	if sub == nil { // shutdown has begun, or maxStreams are open
		bound := time.Now().Add(b.t.closeGrace)
		conn.SetWriteDeadline(bound)
		io.WriteString(conn, "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
		closeWithin(conn, bound)
		return
	}
	go func() {
		defer recoverTo(b.log, "event stream", nil) // the calls below end this stream alone
		defer func() { closeWithin(conn, time.Now().Add(b.t.closeGrace)) }()
		defer b.unsubscribe(sub, out)
		b.log.Debug("stream opened", "remote", conn.RemoteAddr())
		err := b.stream(out, sub, eventStreamHeader, nil)
		b.log.Debug("stream closed", "remote", conn.RemoteAddr(), "err", err)
	}()
}

// ------------------------------------------------------------- snapshot --
//
// Why this exists: the figures themselves, which the fan-out above carries
// without looking at them. A first reading may stop here: what a tick
// carries, from the Go runtime everywhere and the platform file
// (stats_linux.go, stats_other.go).

// snapshot is one stats event's data. Sizes are in bytes. A figure the
// platform cannot measure is nil, and absent from the JSON: 0 would be a
// measurement.
type snapshot struct {
	Time    string       `json:"time"`
	Host    hostStats    `json:"host"`
	Memory  memoryStats  `json:"memory"`
	CPU     cpuStats     `json:"cpu"`
	Process processStats `json:"process"`
	Clients clientStats  `json:"clients"`
}

type hostStats struct {
	Hostname      string    `json:"hostname"`
	OS            string    `json:"os"`                      // GOOS
	Arch          string    `json:"arch"`                    // GOARCH
	Kernel        string    `json:"kernel"`                  // e.g. "Linux 6.1.0"
	User          string    `json:"user"`                    // user name, or the uid where there is no passwd file
	UptimeSeconds *float64  `json:"uptimeSeconds,omitempty"` // Linux
	Load          []float64 `json:"load,omitempty"`          // 1, 5 and 15 minute load averages (Linux)
}

type memoryStats struct {
	TotalBytes      uint64  `json:"totalBytes"`
	AvailableBytes  uint64  `json:"availableBytes"`
	FreeBytes       uint64  `json:"freeBytes"`
	UsedBytes       uint64  `json:"usedBytes"` // TotalBytes - AvailableBytes
	UsedPercent     float64 `json:"usedPercent"`
	Source          string  `json:"source"`                    // "host", "cgroup" or "runtime"
	LimitBytes      uint64  `json:"limitBytes,omitempty"`      // the cgroup's memory limit
	CgroupUsedBytes uint64  `json:"cgroupUsedBytes,omitempty"` // the cgroup's usage, less inactive page cache
}

type cpuStats struct {
	Cores       int      `json:"cores"`
	Model       string   `json:"model"`
	UsedPercent *float64 `json:"usedPercent,omitempty"` // busy share of all cores since the last sample (Linux)
}

type processStats struct {
	Goroutines    int     `json:"goroutines"`
	HeapBytes     uint64  `json:"heapBytes"`
	RSSBytes      uint64  `json:"rssBytes"`
	UptimeSeconds float64 `json:"uptimeSeconds"`
	GoVersion     string  `json:"goVersion"`
}

type clientStats struct {
	Chat int `json:"chat"` // chat connections now
	SSE  int `json:"sse"`  // event streams now (GET /stats requests are not counted)
}

// snapshot takes one sample. Only the sampler goroutine calls it.
func (b *broadcaster) snapshot() snapshot {
	if b.info == nil {
		info := readHostInfo(b.fsys)
		b.info = &info
	}
	info := *b.info
	now := time.Now()
	s := snapshot{Time: stamp(now)}
	s.Host = hostStats{Hostname: info.hostname, OS: runtime.GOOS, Arch: runtime.GOARCH, Kernel: info.kernel, User: info.user}
	s.CPU = cpuStats{Cores: runtime.NumCPU(), Model: info.cpuModel}
	readRuntime(&s)
	s.Process.UptimeSeconds = now.Sub(b.started).Seconds()
	readSystem(b.fsys, info, &s, &b.cpu)

	b.mu.Lock()
	s.Clients.SSE = b.open
	b.mu.Unlock()
	s.Clients.Chat = b.chatClients()
	return s
}

// readRuntime fills the process figures, and the memory figures with the
// runtime's own view (source "runtime") for readSystem to replace.
func readRuntime(s *snapshot) {
	// Reading runtime/metrics does not stop the world, unlike runtime.ReadMemStats.
	m := []metrics.Sample{
		{Name: "/sched/goroutines:goroutines"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/total:bytes"},
		{Name: "/memory/classes/heap/released:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}
	metrics.Read(m)
	value := func(i int) uint64 {
		if m[i].Value.Kind() != metrics.KindUint64 {
			return 0
		}
		return m[i].Value.Uint64()
	}
	total, released := value(2), value(3)
	mapped := total - min(released, total) // memory the runtime holds from the OS
	s.Process = processStats{
		Goroutines: int(value(0)),
		HeapBytes:  value(1),
		RSSBytes:   mapped,
		GoVersion:  runtime.Version(),
	}
	free := value(4)
	s.Memory = memoryStats{TotalBytes: mapped, AvailableBytes: free, FreeBytes: free, Source: "runtime"}
	s.Memory.UsedBytes = mapped - min(free, mapped)
	s.Memory.UsedPercent = percent(s.Memory.UsedBytes, s.Memory.TotalBytes)
}

// hostInfo is what does not change while the server runs, read once.
type hostInfo struct {
	hostname, kernel, user, cpuModel string
	cgroup                           cgroupFiles // where the memory limit is, if any (Linux)
}

// currentUser names the user the server runs as, or gives the uid where
// there is no passwd file (as in a scratch container).
func currentUser() string {
	if u, err := osuser.Current(); err == nil && u.Username != "" {
		return u.Username
	}
	return strconv.Itoa(os.Getuid())
}

// percent returns part as a percentage of whole, rounded to 0.1.
func percent(part, whole uint64) float64 {
	if whole == 0 {
		return 0
	}
	return float64(part*1000/whole) / 10
}
