//go:build !linux

// Stats on platforms other than Linux, from the Go runtime alone.
//
// Go has no portable way to read a machine's memory, CPU use, uptime or
// load, so here the snapshot keeps what readRuntime fills in: memory is the
// Go runtime's own (source "runtime"); cpu.usedPercent, host.uptimeSeconds
// and host.load stay nil, and are left out of the JSON; the host figures are
// those the os package knows. Linux reads the real figures in stats_linux.go.
package main

import (
	"io/fs"
	"os"
	"runtime"
)

// cpuTimes is one CPU-time sample; there is none to take here.
type cpuTimes struct{}

// cgroupFiles names the memory cgroup files on Linux; there are none here.
type cgroupFiles struct{}

// readHostInfo reads what does not change while the server runs.
func readHostInfo(fs.FS) hostInfo {
	hostname, _ := os.Hostname()
	return hostInfo{hostname: hostname, kernel: runtime.GOOS, user: currentUser()}
}

// readSystem adds nothing to what readRuntime filled in: this platform's
// figures are not supported.
func readSystem(fs.FS, hostInfo, *snapshot, *cpuTimes) {}
