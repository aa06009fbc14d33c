package main

// Temporary: sse.go's writer until it has its own (branch stats).

import (
	"io"
	"sync"
	"time"
)

type wire struct {
	conn deadlineWriter
	wait time.Duration

	mu sync.Mutex

	dmu   sync.Mutex
	set   time.Time
	until time.Time
}

type deadlineWriter interface {
	io.Writer
	SetWriteDeadline(time.Time) error
}

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
