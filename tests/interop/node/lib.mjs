// Shared by the Node interop programs: loading the locked packages, reading events with the
// official EventHubConsumerClient, and printing each one as a JSON line.
//
// The packages live outside the source tree (scripts/node-env.sh installs them and prints the
// node_modules path, which the caller passes as TWINHUB_NODE_MODULES), so they are loaded
// through a require() rooted there rather than through bare ESM imports.

import { createRequire } from "node:module";
import path from "node:path";

/** require() for the packages of scripts/node-env.sh. */
export function requireLocked(name) {
  const dir = process.env.TWINHUB_NODE_MODULES;
  if (!dir) {
    throw new Error("TWINHUB_NODE_MODULES is not set: run scripts/node-env.sh and export its output");
  }
  // A require() created for a file beside node_modules resolves from that node_modules.
  const req = createRequire(path.join(path.resolve(dir), "..", "twinhub-resolver.cjs"));
  return req(name);
}

/** JSON for values the SDK hands out: Buffers as text (and base64), Dates as ISO, bigints. */
function plain(value) {
  if (value === null || value === undefined) return value ?? null;
  if (Buffer.isBuffer(value)) return { buffer: value.toString("utf8"), base64: value.toString("base64") };
  if (value instanceof Date) return value.toISOString();
  if (typeof value === "bigint") return value.toString();
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

function bodyText(body) {
  if (Buffer.isBuffer(body)) return body.toString("utf8");
  if (body instanceof Uint8Array) return Buffer.from(body).toString("utf8");
  if (typeof body === "string") return body;
  return JSON.stringify(plain(body));
}

/** One received event as the test reads it. */
export function eventRecord(event, context) {
  const raw = event.getRawAmqpMessage();
  return {
    type: "event",
    partition: context.partitionId,
    consumerGroup: context.consumerGroup,
    body: bodyText(event.body),
    bodyType: raw.bodyType ?? null,
    properties: plain(event.properties ?? {}),
    systemProperties: plain(event.systemProperties ?? {}),
    messageId: plain(event.messageId),
    correlationId: plain(event.correlationId),
    contentType: event.contentType ?? null,
    sequenceNumber: event.sequenceNumber,
    offset: event.offset,
    enqueuedTimeUtc: event.enqueuedTimeUtc ? event.enqueuedTimeUtc.toISOString() : null,
  };
}

export function emit(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

export function describeError(err) {
  if (err === null || err === undefined) return { message: String(err) };
  return {
    name: err.name ?? null,
    code: err.code ?? null,
    condition: err.condition ?? null,
    message: err.message ?? String(err),
    info: plain(err.info ?? null),
  };
}

/**
 * Subscribes with an EventHubConsumerClient (consumer group, all partitions, from the
 * earliest event) and prints each event until `count` events (of the devices in `deviceIds`,
 * when given) have arrived or `timeoutS` has passed. Resolves to the number counted; errors reported by the
 * subscription are printed as {"type":"error"} lines on stdout and returned too.
 */
export async function readEvents(connectionString, opts) {
  const { EventHubConsumerClient, earliestEventPosition } = requireLocked("@azure/event-hubs");
  const clientOptions = {};
  if (opts.websockets) {
    clientOptions.webSocketOptions = { webSocket: requireLocked("ws") };
  }
  const client = new EventHubConsumerClient(opts.consumerGroup ?? "$Default", connectionString, clientOptions);
  const devices = opts.deviceIds && opts.deviceIds.length ? new Set(opts.deviceIds) : null;
  let counted = 0;
  const errors = [];
  let finish;
  const finished = new Promise((resolve) => {
    finish = resolve;
  });
  const timer = setTimeout(() => finish("timeout"), opts.timeoutS * 1000);
  const subscription = client.subscribe(
    {
      processEvents: async (events, context) => {
        for (const event of events) {
          const record = eventRecord(event, context);
          emit(record);
          const device = record.systemProperties["iothub-connection-device-id"];
          if (!devices || devices.has(device)) counted += 1;
        }
        if (counted >= opts.count) finish("count");
      },
      processError: async (err, context) => {
        const record = { type: "error", partition: context?.partitionId ?? null, ...describeError(err) };
        errors.push(record);
        emit(record);
      },
    },
    {
      startPosition: earliestEventPosition,
      maxBatchSize: 100,
      maxWaitTimeInSeconds: 1,
      skipParsingBodyAsJson: true,
    },
  );
  const why = await finished;
  clearTimeout(timer);
  emit({ type: "done", reason: why, counted });
  await subscription.close();
  await client.close();
  return { counted, errors, reason: why };
}
