// Reads telemetry from the built-in Event Hub-compatible endpoint with the official
// @azure/event-hubs EventHubConsumerClient, unchanged.
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> NODE_EXTRA_CA_CERTS=<hub ca.pem> \
//     node read_events.mjs '<Endpoint=sb://...;EntityPath=...>' [--count N] [--timeout S] \
//       [--device ID]... [--websockets] [--consumer-group CG]
//
// Consumer group $Default unless given, every partition, from the earliest event. Prints one
// JSON line per event (see lib.mjs eventRecord), {"type":"error"} lines for errors the
// subscription reports, and a final {"type":"done"} line. Stops after N events (of the given
// devices when --device is given) and exits 0, or after the timeout and exits 2.

import { parseArgs } from "node:util";
import { describeError, emit, readEvents } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    count: { type: "string", default: "1" },
    timeout: { type: "string", default: "30" },
    device: { type: "string", multiple: true },
    websockets: { type: "boolean", default: false },
    "consumer-group": { type: "string", default: "$Default" },
  },
});

if (positionals.length !== 1) {
  process.stderr.write("usage: node read_events.mjs <event hub connection string> [--count N] [--timeout S] [--device ID]... [--websockets]\n");
  process.exit(64);
}

try {
  const result = await readEvents(positionals[0], {
    count: Number(values.count),
    timeoutS: Number(values.timeout),
    deviceIds: values.device,
    websockets: values.websockets,
    consumerGroup: values["consumer-group"],
  });
  process.exit(result.reason === "count" ? 0 : 2);
} catch (err) {
  emit({ type: "fatal", ...describeError(err) });
  process.stderr.write(`read_events: ${err?.stack ?? err}\n`);
  process.exit(1);
}
