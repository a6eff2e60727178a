#!/usr/bin/env python3
# Per-call legs of C=1 request/response calls from a syscall trace, for a server (the hub or
# Mosquitto) and the bench. With one call in flight the server's events are serial: its first
# read on the caller's socket (the socket it reads most), its write to a device socket, its
# read of the device's answer, its write back on the caller's socket.
#   perf script -F comm,pid,tid,time,event,trace | legs.py SERVER_PID BENCH_PID
import sys, re, statistics, collections
spid, bpid = int(sys.argv[1]), int(sys.argv[2])
rx = re.compile(r'^\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$')
ev = {spid: [], bpid: []}
pend = {}
stats = collections.Counter()
for line in sys.stdin:
    m = rx.match(line)
    if not m: continue
    comm, pid, tid, t, name, args = m.groups(); pid = int(pid); tid = int(tid); t = float(t)
    if pid not in ev: continue
    if not name.startswith('syscalls:'): 
        if name == 'sched:sched_switch': stats[(pid, 'switch')] += 1
        continue
    kind, sc = name[len('syscalls:sys_'):].split('_', 1)
    if kind == 'enter':
        fm = re.search(r'fd: (0x[0-9a-f]+)', args)
        fd = int(fm.group(1), 16) if fm else None
        pend[tid] = (sc, fd, t)
        stats[(pid, sc)] += 1
        if sc in ('writev', 'write', 'sendto'):
            ev[pid].append((t, 'w', fd, 0))
    else:
        p = pend.pop(tid, None)
        if not p: continue
        sc2, fd, t0 = p
        ret = int(args.strip(), 16) if args.strip().startswith('0x') else 0
        if ret >= 1 << 63: ret -= 1 << 64
        if sc2 in ('recvfrom', 'read') and ret > 0:
            ev[pid].append((t, 'r', fd, ret))
def legs(events):
    reads = collections.Counter(fd for _, k, fd, _ in events if k == 'r')
    front = reads.most_common(1)[0][0]
    st = 'idle'; out = collections.defaultdict(list); t0 = t1 = t2 = t3 = None
    for t, k, fd, ret in events:
        if k == 'r' and fd == front and st in ('idle', 'client'):
            if st == 'client': out['client (response out -> next request in)'].append(t - t3)
            t0 = t; st = 'in'
        elif k == 'w' and fd != front and st == 'in':
            t1 = t; out['server inbound (request in -> PUBLISH to device)'].append(t1 - t0); st = 'dev'
        elif k == 'r' and fd != front and st == 'dev':
            t2 = t; out['device (PUBLISH out -> answer in)'].append(t2 - t1); st = 'out'
        elif k == 'w' and fd == front and st == 'out':
            t3 = t; out['server outbound (answer in -> response out)'].append(t3 - t2); st = 'client'
            out['round trip at the server socket'].append(t3 - t0)
    return front, out
front, out = legs(ev[spid])
print(f"front fd {front}")
for k, v in out.items():
    v = sorted(v); n = len(v)
    print(f"  {k:50s} n={n:5d} p50 {1e6*v[n//2]:7.1f} us  p10 {1e6*v[n//10]:7.1f}  p90 {1e6*v[9*n//10]:7.1f}")
calls = len(out['round trip at the server socket'])
for (pid, sc), c in sorted(stats.items()):
    who = 'server' if pid == spid else 'bench'
    print(f"  {who:6s} {sc:12s} {c/calls:6.2f} per call")
