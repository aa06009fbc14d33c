// Linux stats, read from /proc and the cgroup file system.
//
// Where each figure comes from:
//
//	host.hostname       /proc/sys/kernel/hostname
//	host.kernel         /proc/sys/kernel/ostype and osrelease ("Linux 6.1.0")
//	host.uptimeSeconds  /proc/uptime, first field
//	host.load           /proc/loadavg, first three fields
//	memory              /proc/meminfo: MemTotal, MemAvailable, MemFree; used = total - available
//	memory (container)  the memory cgroup named in /proc/self/cgroup: v2 memory.max and
//	                    memory.current, or v1 memory.limit_in_bytes and memory.usage_in_bytes;
//	                    less inactive page cache from memory.stat, as `docker stats` counts it
//	cpu.model           /proc/cpuinfo, "model name" (x86) or "Model" (ARM)
//	cpu.usedPercent     two samples of the "cpu" line of /proc/stat; idle = idle + iowait
//	process.rssBytes    /proc/self/statm, resident pages times the page size
//
// A file that cannot be read leaves the Go runtime's figure in place, so a
// container without /proc reports memory with source "runtime" rather than
// failing.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"
)

// noLimit is the smallest cgroup v1 memory limit that means "unlimited":
// the kernel reports its page-counter maximum, about 2^63 rounded to a page.
const noLimit = 1 << 62

// cpuTimes is one sample of the "cpu" line of /proc/stat, in clock ticks.
type cpuTimes struct {
	total, idle uint64
}

// cgroupFiles names the memory cgroup files of this process, when a memory
// limit applies; the zero value means none does.
type cgroupFiles struct {
	limit       uint64 // bytes
	usage       string // memory.current (v2) or memory.usage_in_bytes (v1)
	stat        string // memory.stat
	inactiveKey string // memory.stat's inactive page cache: inactive_file (v2) or total_inactive_file (v1)
}

// readHostInfo reads what does not change while the server runs.
func readHostInfo(fsys fs.FS) hostInfo {
	info := hostInfo{user: currentUser()}
	if b, err := fs.ReadFile(fsys, "proc/sys/kernel/hostname"); err == nil {
		info.hostname = strings.TrimSpace(string(b))
	} else {
		info.hostname, _ = os.Hostname()
	}
	ostype, err1 := fs.ReadFile(fsys, "proc/sys/kernel/ostype")
	release, err2 := fs.ReadFile(fsys, "proc/sys/kernel/osrelease")
	if err1 == nil && err2 == nil {
		info.kernel = strings.TrimSpace(string(ostype)) + " " + strings.TrimSpace(string(release))
	} else {
		info.kernel = "Linux"
	}
	if b, err := fs.ReadFile(fsys, "proc/cpuinfo"); err == nil {
		info.cpuModel = parseCPUModel(b)
	}
	if b, err := fs.ReadFile(fsys, "proc/self/cgroup"); err == nil {
		info.cgroup = findCgroup(fsys, b)
	}
	return info
}

// readSystem fills s with what /proc says now. prev is the CPU sample from the
// last call, replaced by this one; the first call measures since boot.
func readSystem(fsys fs.FS, info hostInfo, s *snapshot, prev *cpuTimes) {
	if b, err := fs.ReadFile(fsys, "proc/uptime"); err == nil {
		if f, err := parseFloats(b, 1); err == nil {
			s.Host.UptimeSeconds = f[0]
		}
	}
	if b, err := fs.ReadFile(fsys, "proc/loadavg"); err == nil {
		if f, err := parseFloats(b, 3); err == nil {
			s.Host.Load = f
		}
	}
	if b, err := fs.ReadFile(fsys, "proc/stat"); err == nil {
		if now, err := parseCPUTimes(b); err == nil {
			s.CPU.UsedPercent = cpuPercent(*prev, now)
			*prev = now
		}
	}
	if b, err := fs.ReadFile(fsys, "proc/self/statm"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 1 {
			if pages, err := strconv.ParseUint(f[1], 10, 64); err == nil {
				s.Process.RSSBytes = pages * uint64(os.Getpagesize())
			}
		}
	}
	b, err := fs.ReadFile(fsys, "proc/meminfo")
	if err != nil {
		return
	}
	m, err := parseMeminfo(b)
	if err != nil {
		return
	}
	s.Memory = memoryStats{TotalBytes: m.total, AvailableBytes: m.available, FreeBytes: m.free, Source: "host"}
	if cg := info.cgroup; cg.limit > 0 && cg.limit < m.total {
		if used, ok := readCgroupUsage(fsys, cg); ok {
			// The container's view: its limit is its total.
			s.Memory = memoryStats{
				TotalBytes:      cg.limit,
				AvailableBytes:  cg.limit - min(used, cg.limit),
				FreeBytes:       cg.limit - min(used, cg.limit),
				Source:          "cgroup",
				LimitBytes:      cg.limit,
				CgroupUsedBytes: used,
			}
		}
	}
	s.Memory.UsedBytes = s.Memory.TotalBytes - s.Memory.AvailableBytes
	s.Memory.UsedPercent = percent(s.Memory.UsedBytes, s.Memory.TotalBytes)
}

// meminfo holds the /proc/meminfo figures pollfree shows, in bytes.
type meminfo struct {
	total, available, free uint64
}

// parseMeminfo reads "Key:   123 kB" lines. (MemAvailable is there since
// Linux 3.14, 2014.)
func parseMeminfo(b []byte) (meminfo, error) {
	var m meminfo
	var haveTotal bool
	for line := range bytes.Lines(b) {
		key, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil || n > 1<<53 {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			n *= 1024
		}
		switch string(key) {
		case "MemTotal":
			m.total, haveTotal = n, true
		case "MemAvailable":
			m.available = n
		case "MemFree":
			m.free = n
		}
	}
	if !haveTotal || m.total == 0 {
		return m, errors.New("meminfo: no MemTotal")
	}
	m.available = min(m.available, m.total)
	m.free = min(m.free, m.total)
	return m, nil
}

// parseCPUTimes reads the aggregate "cpu" line of /proc/stat: user nice
// system idle iowait irq softirq steal (guest time is already in user).
func parseCPUTimes(b []byte) (cpuTimes, error) {
	for line := range bytes.Lines(b) {
		f := strings.Fields(string(line))
		if len(f) < 5 || f[0] != "cpu" {
			continue
		}
		var t cpuTimes
		for i, s := range f[1:min(len(f), 9)] {
			n, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				return cpuTimes{}, errors.New("stat: bad cpu field " + strconv.Quote(s))
			}
			t.total += n
			if i == 3 || i == 4 { // idle, iowait
				t.idle += n
			}
		}
		return t, nil
	}
	return cpuTimes{}, errors.New("stat: no cpu line")
}

// cpuPercent is the busy share of CPU time between two samples.
func cpuPercent(prev, now cpuTimes) float64 {
	if now.total <= prev.total || now.idle < prev.idle {
		return 0
	}
	total, idle := now.total-prev.total, now.idle-prev.idle
	return percent(total-min(idle, total), total)
}

// parseFloats reads the first n space-separated numbers of b.
func parseFloats(b []byte, n int) ([]float64, error) {
	f := strings.Fields(string(b))
	if len(f) < n {
		return nil, errors.New("want " + strconv.Itoa(n) + " numbers, got " + strconv.Itoa(len(f)))
	}
	out := make([]float64, n)
	for i := range out {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil || v < 0 || v > 1e15 {
			return nil, errors.New("bad number " + strconv.Quote(f[i]))
		}
		out[i] = v
	}
	return out, nil
}

// parseCPUModel returns the first CPU's model name from /proc/cpuinfo.
func parseCPUModel(b []byte) string {
	for line := range bytes.Lines(b) {
		key, value, ok := strings.Cut(string(line), ":")
		if key = strings.TrimSpace(key); ok && (key == "model name" || key == "Model") {
			return strings.TrimSpace(value)
		}
	}
	return ""
}

// findCgroup finds the memory cgroup of this process, given /proc/self/cgroup,
// and returns its files if a memory limit is set. Each candidate is tried in
// turn: the process's own cgroup under the mount, then the mount's root (a
// container without a cgroup namespace sees its own cgroup there).
func findCgroup(fsys fs.FS, selfCgroup []byte) cgroupFiles {
	var v2, v1 string
	haveV2, haveV1 := false, false
	sc := bufio.NewScanner(bytes.NewReader(selfCgroup))
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2, haveV2 = parts[2], true
		case hasController(parts[1], "memory"):
			v1, haveV1 = parts[2], true
		}
	}
	if haveV1 {
		for _, dir := range []string{path.Join("sys/fs/cgroup/memory", v1), "sys/fs/cgroup/memory"} {
			if limit, ok := readLimit(fsys, path.Join(dir, "memory.limit_in_bytes")); ok {
				return cgroupFiles{limit, path.Join(dir, "memory.usage_in_bytes"), path.Join(dir, "memory.stat"), "total_inactive_file"}
			}
		}
	}
	if haveV2 {
		for _, dir := range []string{path.Join("sys/fs/cgroup", v2), "sys/fs/cgroup"} {
			if limit, ok := readLimit(fsys, path.Join(dir, "memory.max")); ok {
				return cgroupFiles{limit, path.Join(dir, "memory.current"), path.Join(dir, "memory.stat"), "inactive_file"}
			}
		}
	}
	return cgroupFiles{}
}

func hasController(list, name string) bool {
	for c := range strings.SplitSeq(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// readLimit reads a cgroup memory limit; "max" (v2) or a value of noLimit
// and over (v1) mean none is set.
func readLimit(fsys fs.FS, name string) (uint64, bool) {
	b, err := fs.ReadFile(fsys, name)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n == 0 || n >= noLimit {
		return 0, false
	}
	return n, true
}

// readCgroupUsage returns the cgroup's memory usage less its inactive page
// cache, which the kernel reclaims before it would hit the limit.
func readCgroupUsage(fsys fs.FS, cg cgroupFiles) (uint64, bool) {
	b, err := fs.ReadFile(fsys, cg.usage)
	if err != nil {
		return 0, false
	}
	used, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, false
	}
	if stat, err := fs.ReadFile(fsys, cg.stat); err == nil {
		for line := range bytes.Lines(stat) {
			key, value, _ := strings.Cut(strings.TrimSpace(string(line)), " ")
			if key == cg.inactiveKey {
				if n, err := strconv.ParseUint(value, 10, 64); err == nil && n <= used {
					used -= n
				}
				break
			}
		}
	}
	return used, true
}
