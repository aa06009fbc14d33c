// Linux stats, read from /proc and the cgroup file system.
//
// Where each figure comes from:
//
//	host.hostname       /proc/sys/kernel/hostname
//	host.kernel         /proc/sys/kernel/ostype and osrelease ("Linux 6.1.0")
//	host.uptimeSeconds  /proc/uptime, first field
//	host.load           /proc/loadavg, first three fields
//	memory              /proc/meminfo: MemTotal, MemAvailable, MemFree; used = total - available
//	memory (container)  the tightest limit among the cgroup named in /proc/self/cgroup and its
//	                    ancestors up to the mount's root (a parent's limit binds too): v2
//	                    memory.max, or v1 memory.limit_in_bytes; usage from that same cgroup's
//	                    memory.current (v2) or memory.usage_in_bytes (v1), less inactive page
//	                    cache from its memory.stat, as `docker stats` counts it
//	cpu.model           /proc/cpuinfo, "model name" (x86) or "Model" (ARM)
//	cpu.usedPercent     two samples of the "cpu" line of /proc/stat; idle = idle + iowait
//	process.rssBytes    /proc/self/statm, resident pages times the page size
//
// A file that cannot be read leaves the Go runtime's figure in place, so a
// container without /proc reports memory with source "runtime" rather than
// failing.
package main

import (
	"io/fs"
	"os"
	"path"
	"slices"
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

// cgroupFiles names the files of the memory cgroup whose limit binds this
// process (its own or an ancestor's); the zero value means no limit does.
type cgroupFiles struct {
	limit       uint64 // bytes
	usage       string // memory.current (v2) or memory.usage_in_bytes (v1)
	stat        string // memory.stat
	inactiveKey string // memory.stat's inactive page cache: inactive_file (v2) or total_inactive_file (v1)
}

// readHostInfo reads what does not change while the server runs.
func readHostInfo(fsys fs.FS) hostInfo {
	info := hostInfo{hostname: readString(fsys, "proc/sys/kernel/hostname"), kernel: "Linux", user: currentUser()}
	if info.hostname == "" {
		info.hostname, _ = os.Hostname()
	}
	ostype, release := readString(fsys, "proc/sys/kernel/ostype"), readString(fsys, "proc/sys/kernel/osrelease")
	if ostype != "" && release != "" {
		info.kernel = ostype + " " + release
	}
	info.cpuModel = parseCPUModel(readString(fsys, "proc/cpuinfo"))
	info.cgroup = findCgroup(fsys, readString(fsys, "proc/self/cgroup"))
	return info
}

// readSystem fills s with what /proc says now. prev is the CPU sample from the
// last call, replaced by this one; the first call measures since boot.
func readSystem(fsys fs.FS, info hostInfo, s *snapshot, prev *cpuTimes) {
	if f, ok := parseFloats(readString(fsys, "proc/uptime"), 1); ok {
		s.Host.UptimeSeconds = &f[0]
	}
	if f, ok := parseFloats(readString(fsys, "proc/loadavg"), 3); ok {
		s.Host.Load = f
	}
	if now, ok := parseCPUTimes(readString(fsys, "proc/stat")); ok {
		used := cpuPercent(*prev, now)
		s.CPU.UsedPercent = &used
		*prev = now
	}
	if f := strings.Fields(readString(fsys, "proc/self/statm")); len(f) > 1 {
		if pages, err := strconv.ParseUint(f[1], 10, 64); err == nil {
			s.Process.RSSBytes = pages * uint64(os.Getpagesize())
		}
	}
	m, ok := parseMeminfo(readString(fsys, "proc/meminfo"))
	if !ok {
		return
	}
	if cg := info.cgroup; cg.limit > 0 && cg.limit < m.TotalBytes {
		if used, ok := readCgroupUsage(fsys, cg); ok {
			// The container's view: its limit is its total.
			free := cg.limit - min(used, cg.limit)
			m = memoryStats{TotalBytes: cg.limit, AvailableBytes: free, FreeBytes: free, Source: "cgroup", LimitBytes: cg.limit, CgroupUsedBytes: used}
		}
	}
	m.UsedBytes = m.TotalBytes - m.AvailableBytes
	m.UsedPercent = percent(m.UsedBytes, m.TotalBytes)
	s.Memory = m
}

// parseMeminfo reads the "Key:   123 kB" lines pollfree shows. It reports
// false without a MemTotal (as for a file that could not be read).
func parseMeminfo(text string) (memoryStats, bool) {
	m := memoryStats{Source: "host"}
	for line := range strings.Lines(text) {
		key, rest, _ := strings.Cut(line, ":")
		f := strings.Fields(rest)
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
		switch key {
		case "MemTotal":
			m.TotalBytes = n
		case "MemAvailable":
			m.AvailableBytes = n
		case "MemFree":
			m.FreeBytes = n
		}
	}
	m.AvailableBytes = min(m.AvailableBytes, m.TotalBytes)
	m.FreeBytes = min(m.FreeBytes, m.TotalBytes)
	return m, m.TotalBytes > 0
}

// parseCPUTimes reads the aggregate "cpu" line of /proc/stat: user nice
// system idle iowait irq softirq steal (guest time is already in user).
func parseCPUTimes(text string) (cpuTimes, bool) {
	for line := range strings.Lines(text) {
		f := strings.Fields(line)
		if len(f) < 5 || f[0] != "cpu" {
			continue
		}
		var t cpuTimes
		for i, s := range f[1:min(len(f), 9)] {
			n, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				return cpuTimes{}, false
			}
			t.total += n
			if i == 3 || i == 4 { // idle, iowait
				t.idle += n
			}
		}
		return t, true
	}
	return cpuTimes{}, false
}

// cpuPercent is the busy share of CPU time between two samples.
func cpuPercent(prev, now cpuTimes) float64 {
	if now.total <= prev.total || now.idle < prev.idle {
		return 0
	}
	total, idle := now.total-prev.total, now.idle-prev.idle
	return percent(total-min(idle, total), total)
}

// parseFloats reads the first n space-separated numbers of s.
func parseFloats(s string, n int) ([]float64, bool) {
	f := strings.Fields(s)
	if len(f) < n {
		return nil, false
	}
	out := make([]float64, n)
	for i := range out {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil || !(v >= 0 && v <= 1e15) { // NaN too: it has no JSON encoding
			return nil, false
		}
		out[i] = v
	}
	return out, true
}

// parseCPUModel returns the first CPU's model name from /proc/cpuinfo.
func parseCPUModel(text string) string {
	for line := range strings.Lines(text) {
		key, value, ok := strings.Cut(line, ":")
		if key = strings.TrimSpace(key); ok && (key == "model name" || key == "Model") {
			return strings.TrimSpace(value)
		}
	}
	return ""
}

// findCgroup finds the memory limit that binds this process, given
// /proc/self/cgroup, and returns its cgroup's files; the zero value if none
// does. A limit set on a parent cgroup binds the children too, so it walks
// from the process's own cgroup up to the mount's root and keeps the
// tightest limit it reads. The walk also finds a container's limit when it
// runs without a cgroup namespace: its own cgroup is then the mount's root,
// and the path /proc/self/cgroup names does not exist under the mount.
func findCgroup(fsys fs.FS, selfCgroup string) cgroupFiles {
	var tightest cgroupFiles
	for line := range strings.Lines(selfCgroup) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		var root, limitFile, usageFile, inactiveKey string
		switch {
		case len(parts) != 3:
			continue
		case parts[0] == "0" && parts[1] == "":
			root, limitFile, usageFile, inactiveKey = "sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"
		case slices.Contains(strings.Split(parts[1], ","), "memory"):
			root, limitFile, usageFile, inactiveKey = "sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
		default:
			continue
		}
		for cg := path.Clean("/" + parts[2]); ; cg = path.Dir(cg) { // Clean keeps a "/.." from leaving the mount
			dir := path.Join(root, cg)
			if limit, ok := readLimit(fsys, path.Join(dir, limitFile)); ok && (tightest.limit == 0 || limit < tightest.limit) {
				tightest = cgroupFiles{limit, path.Join(dir, usageFile), path.Join(dir, "memory.stat"), inactiveKey}
			}
			if cg == "/" {
				break
			}
		}
	}
	return tightest
}

// readLimit reads a cgroup memory limit; "max" (v2) or a value of noLimit
// and over (v1) mean none is set.
func readLimit(fsys fs.FS, name string) (uint64, bool) {
	n, err := strconv.ParseUint(readString(fsys, name), 10, 64)
	return n, err == nil && n > 0 && n < noLimit
}

// readCgroupUsage returns the cgroup's memory usage less its inactive page
// cache, which the kernel reclaims before it would hit the limit.
func readCgroupUsage(fsys fs.FS, cg cgroupFiles) (uint64, bool) {
	used, err := strconv.ParseUint(readString(fsys, cg.usage), 10, 64)
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(readString(fsys, cg.stat)) {
		if key, value, _ := strings.Cut(strings.TrimSpace(line), " "); key == cg.inactiveKey {
			if n, err := strconv.ParseUint(value, 10, 64); err == nil && n <= used {
				used -= n
			}
			break
		}
	}
	return used, true
}

// readString returns a file's text without the white space around it, or ""
// if it cannot be read.
func readString(fsys fs.FS, name string) string {
	b, _ := fs.ReadFile(fsys, name)
	return strings.TrimSpace(string(b))
}
