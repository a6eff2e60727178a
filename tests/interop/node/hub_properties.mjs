// Asks the built-in Event Hub-compatible endpoint for its metadata with the official
// @azure/event-hubs EventHubConsumerClient: getEventHubProperties(), then
// getPartitionProperties() for every partition (the $management READ requests).
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> NODE_EXTRA_CA_CERTS=<hub ca.pem> \
//     node hub_properties.mjs '<Endpoint=sb://...;EntityPath=...>'
//
// Retries are off (the SDK retries even an UnauthorizedError, 30 s apart by default), so an
// error shows at once. Prints {"type":"hub"}, one {"type":"partition"} per partition, or a
// {"type":"fatal"} line with the error; exits 0, or 1 on an error.

import { describeError, emit, requireLocked } from "./lib.mjs";

const [connectionString] = process.argv.slice(2);
if (!connectionString) {
  process.stderr.write("usage: node hub_properties.mjs <event hub connection string>\n");
  process.exit(64);
}

const { EventHubConsumerClient } = requireLocked("@azure/event-hubs");
const client = new EventHubConsumerClient("$Default", connectionString, {
  retryOptions: { maxRetries: 0, timeoutInMs: 20000 },
});
let rc = 0;
try {
  const hub = await client.getEventHubProperties();
  emit({
    type: "hub",
    name: hub.name,
    createdOn: hub.createdOn instanceof Date ? hub.createdOn.toISOString() : String(hub.createdOn),
    partitionIds: hub.partitionIds,
  });
  for (const id of hub.partitionIds) {
    const p = await client.getPartitionProperties(id);
    emit({
      type: "partition",
      eventHubName: p.eventHubName,
      partitionId: p.partitionId,
      beginningSequenceNumber: p.beginningSequenceNumber,
      lastEnqueuedSequenceNumber: p.lastEnqueuedSequenceNumber,
      lastEnqueuedOffset: p.lastEnqueuedOffset,
      lastEnqueuedOnUtc: p.lastEnqueuedOnUtc instanceof Date ? p.lastEnqueuedOnUtc.toISOString() : String(p.lastEnqueuedOnUtc),
      isEmpty: p.isEmpty,
    });
  }
} catch (err) {
  emit({ type: "fatal", ...describeError(err) });
  process.stderr.write(`hub_properties: ${err?.stack ?? err}\n`);
  rc = 1;
} finally {
  await client.close();
}
process.exit(rc);
