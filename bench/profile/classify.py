#!/usr/bin/env python3
# Buckets perf-script samples (`perf script -F comm,tid,ip,sym,dso --no-inline` of a
# `perf record -F 1999 --call-graph dwarf` profile) by the innermost frame that names a known
# layer; a sample in the kernel goes to the syscall its first user frame made.
#   classify.py SCRIPT_FILE [CALLS] [-v]    (CALLS: calls completed while recording -> us/call)
import re, sys, collections
USER = [
 ('allocator', r'^(malloc|_int_malloc|_int_free|cfree|free|realloc|_int_realloc|calloc|malloc_consolidate|unlink_chunk|tcache|__rustc::__rd?l_|__rust_(alloc|dealloc|realloc)|__libc_malloc|__libc_free|__GI___libc_(malloc|free|realloc)|alloc::raw_vec|alloc_perturb|sysmalloc|mi_)'),
 ('memcpy/memmove', r'^(__memmove|__memcpy|__memset|__memcmp|memcpy|memmove)'),
 ('TLS (rustls, ring, OpenSSL)', r'(rustls::|ring_core|ring::|tokio_rustls|libssl|libcrypto|^SSL_|^EVP_|aes|gcm|sha256|ChaCha|chacha)'),
 ('SAS check (token parse + HMAC)', r'(twinhub_core::auth|twinhub_proto::sas|hmac|sha2::)'),
 ('JSON (serde_json)', r'(serde_json|serde::de|serde::ser|CloudToDeviceMethod)'),
 ('HTTP/2 framing + HPACK (h2)', r'^(<)?h2::|hpack'),
 ('HTTP/1.1 (hyper h1)', r'hyper::proto::h1|httparse'),
 ('hyper (h2 glue, service, body)', r'hyper(_util)?::'),
 ('metrics + trace middleware', r'(metrics|tower_http::trace|tracing::|tracing_core|twinhub_server::rest::track|sketches|quanta)'),
 ('axum router, tower layers, http types', r'(axum|tower::|tower_service|matchit|tower_http|http::header|http::request|http::extensions|http::uri)'),
 ('MQTT codec', r'twinhub_mqtt::'),
 ('method handler + directory (hub core)', r'(twinhub_core::|twinhub_server::rest::twins|MethodCall)'),
 ('MQTT session task', r'twinhub_server::mqtt'),
 ('HTTP connection wrapper (http_conn)', r'twinhub_server::http_conn'),
 ('tokio timers', r'tokio::(runtime::time|time::)'),
 ('tokio sync (oneshot, Notify)', r'tokio::sync::'),
 ('event loop (tokio I/O driver; mosquitto epoll mux)', r'(tokio::runtime::io|mio::|tokio::io::|tokio::net::|epoll)'),
 ('tokio scheduler', r'tokio::runtime|tokio::task|^pow|__ieee754_pow'),
 # mosquitto's own
 ('mosquitto: packet handling', r'^(packet__|handle__|send__|db__|sub__|mux_|loop_|mosquitto_|mosquitto__|net__|context__|keepalive__|property__|will__|session_expiry|plugin__|acl__|retain__|subs__|log__|util__|sub__messages_queue|mux__)'),
]
USER = [(n, re.compile(p)) for n, p in USER]
SYSCALL = [
 ('kernel: socket write (incl. waking the peer)', r'(writev|__libc_send|sendto|^send$|__GI___send|^__write|^write$|__GI___libc_write|_IO_)'),
 ('kernel: socket read', r'(recv|^__libc_read|^read$|__GI___libc_read)'),
 ('kernel: epoll_wait (sleep, wake-up, switch)', r'epoll'),
 ('kernel: futex (thread wake/park)', r'(futex|pthread_cond|__lll_lock|syscall$)'),
 ('kernel: clock/other syscalls', r'.'),
]
def main(path, calls):
    samples = []
    cur = None
    for line in open(path, errors='replace'):
        if not line.strip():
            if cur is not None: samples.append(cur); cur = None
            continue
        if not line.startswith('\t') and not line.startswith(' ' * 8):
            cur = []
            continue
        parts = line.strip().split(' ', 1)
        if len(parts) < 2 or cur is None: continue
        m = re.match(r'(.*) \((.*)\)$', parts[1])
        sym, dso = (m.group(1), m.group(2)) if m else (parts[1], '')
        sym = re.sub(r'\+0x[0-9a-f]+$', '', sym)
        cur.append((sym, dso))
    if cur: samples.append(cur)
    cnt = collections.Counter()
    other = collections.Counter()
    for fr in samples:
        if not fr: continue
        cat = None
        if 'kernel' in fr[0][1]:
            user = next(((s, d) for s, d in fr if 'kernel' not in d), None)
            kname = user[0] if user else ''
            if user is None:
                cat = 'kernel: no user frame (irq, softirq)'
            else:
                for n, p in SYSCALL:
                    if re.search(p, kname): cat = n; break
        else:
            for s, d in fr:
                for n, p in USER:
                    if p.search(s): cat = n; break
                if cat: break
            if cat is None:
                cat = 'other user'; other[fr[0][0][:90]] += 1
        cnt[cat] += 1
    tot = sum(cnt.values())
    print(f"{path}: {tot} samples" + (f", {calls:.0f} calls -> us/call at 1999 Hz: {tot/1999/calls*1e6:.1f}" if calls else ''))
    for n, c in cnt.most_common():
        extra = f"{c/1999/calls*1e6:7.1f} us/call" if calls else ''
        print(f"  {100*c/tot:5.1f}%  {extra}  {n}")
    if '-v' in sys.argv:
        print('  other user leaves:', other.most_common(25))
if __name__ == '__main__':
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != '-v' else 0)
