#!/usr/bin/env python3
# Per-call figures from methods-stat.sh: stat_summary.py BASE (BASE.json, BASE.*.stat; 6 s
# windows; calls = the phase's calls/s x 6).
import json, re, sys
base = sys.argv[1]
m = json.load(open(base + '.json'))['methods'][0]
keys = {'hub-h2': 'twinhub', 'hub-h1': 'twinhub_http1', 'mosq': 'mosquitto'}
print(f"{base}: C={m['concurrency']}; p50 " + ', '.join(f"{k} {m[v]['latency']['p50_us']} us" for k, v in keys.items())
      + '; calls/s ' + ', '.join(f"{k} {m[v]['per_second']:.0f}" for k, v in keys.items()))
for who, key in keys.items():
    calls = m[key]['per_second'] * 6
    vals = {}
    for line in open(f'{base}.{who}.stat'):
        mm = re.match(r'\s*([\d.,]+)\s+(msec\s+)?(\S+)', line)
        if mm and not line.strip().startswith('#'):
            try:
                vals[mm.group(3)] = float(mm.group(1).replace(',', ''))
            except ValueError:
                pass
    sc = {k.replace('syscalls:sys_enter_', ''): v / calls for k, v in vals.items() if k.startswith('syscalls')}
    print(f"  {who:7s} CPU {vals.get('task-clock', 0) * 1000 / calls:6.1f} us/call, context switches "
          f"{vals.get('context-switches', 0) / calls:5.2f}, " + ', '.join(f"{k} {v:.2f}" for k, v in sorted(sc.items()) if v > 0.005))
