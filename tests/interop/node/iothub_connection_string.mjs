// Starts from an IoT Hub service connection string, as Azure's Event Hubs JS sample for IoT Hub
// does: asks the hub where its built-in events endpoint is (a receiver on the hub's own
// messages/events/$management, answered with an amqp:link:redirect detach), builds the Event
// Hubs connection string from the redirect, and reads with the official EventHubConsumerClient.
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> NODE_EXTRA_CA_CERTS=<hub ca.pem> \
//     node iothub_connection_string.mjs '<HostName=...;SharedAccessKeyName=...;SharedAccessKey=...>' \
//       [--count N] [--timeout S] [--device ID]...
//
// The discovery step: rhea (through rhea-promise) over TLS to <HostName>:5671, SASL PLAIN with
// user `<policy>@sas.root.<first label of HostName>` and a SAS token for
// `<HostName>/messages/events` signed with the base64-decoded key. The redirect's info gives
// the Event Hubs host (`hostname`) and, from `address` with the sample's pattern
// `:<port>/<name>/$management`, the entity name.
//
// Prints {"type":"redirect"} with what the redirect said, then the lines of read_events.mjs.
// Exit codes: 0 after N events, 2 on timeout, 3 when no redirect came, 1 on other errors.

import crypto from "node:crypto";
import { parseArgs } from "node:util";
import { describeError, emit, readEvents, requireLocked } from "./lib.mjs";

const REDIRECT = "amqp:link:redirect";
// The sample's pattern for the entity name in the redirect address.
const MANAGEMENT_ADDRESS = /:\d+\/(.*)\/\$management/i;

/** An IoT Hub SAS token: HMAC-SHA256 with the decoded key over `<encoded uri>\n<expiry>`. */
function iotHubSasToken(resourceUri, keyBase64, policy, ttlSeconds) {
  const sr = encodeURIComponent(resourceUri);
  const se = Math.ceil(Date.now() / 1000) + ttlSeconds;
  const sig = crypto.createHmac("sha256", Buffer.from(keyBase64, "base64")).update(`${sr}\n${se}`).digest("base64");
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=${policy}`;
}

/** Resolves to {connectionString, redirect} or rejects with the link error it got instead. */
async function eventHubsConnectionString(iotHubConnectionString, timeoutS) {
  const rheaPromise = requireLocked("rhea-promise");
  const { Connection, ReceiverEvents, parseConnectionString } = rheaPromise;
  const { HostName, SharedAccessKeyName, SharedAccessKey } = parseConnectionString(iotHubConnectionString);
  if (!HostName || !SharedAccessKeyName || !SharedAccessKey) {
    throw new Error("not an IoT Hub service connection string (HostName, SharedAccessKeyName, SharedAccessKey)");
  }
  const hubName = HostName.split(".")[0];
  const connection = new Connection({
    transport: "tls",
    host: HostName,
    hostname: HostName,
    port: 5671,
    reconnect: false,
    username: `${SharedAccessKeyName}@sas.root.${hubName}`,
    password: iotHubSasToken(`${HostName}/messages/events`, SharedAccessKey, SharedAccessKeyName, 300),
  });
  await connection.open();
  try {
    const receiver = await connection.createReceiver({
      source: { address: `amqps://${HostName}/messages/events/$management` },
    });
    const error = await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no ${REDIRECT} within ${timeoutS}s of attaching to messages/events/$management`)),
        timeoutS * 1000,
      );
      receiver.on(ReceiverEvents.receiverError, (context) => {
        clearTimeout(timer);
        resolve(context.receiver && context.receiver.error);
      });
    });
    if (!rheaPromise.isAmqpError(error) || error.condition !== REDIRECT || !error.info) {
      const e = new Error(`the link failed without a redirect: ${JSON.stringify(describeError(error))}`);
      e.linkError = error;
      throw e;
    }
    const { hostname, address } = error.info;
    const match = MANAGEMENT_ADDRESS.exec(address ?? "");
    if (!hostname || !match) {
      throw new Error(`the redirect lacks a host name or an address of the form :<port>/<name>/$management: ${JSON.stringify(describeError(error))}`);
    }
    const entityPath = match[1];
    return {
      connectionString: `Endpoint=sb://${hostname}/;EntityPath=${entityPath};SharedAccessKeyName=${SharedAccessKeyName};SharedAccessKey=${SharedAccessKey}`,
      redirect: {
        type: "redirect",
        condition: error.condition,
        description: error.description ?? null,
        hostname,
        networkHost: error.info["network-host"] ?? null,
        port: error.info.port ?? null,
        address,
        entityPath,
      },
    };
  } finally {
    await connection.close().catch(() => {});
  }
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    count: { type: "string", default: "1" },
    timeout: { type: "string", default: "30" },
    device: { type: "string", multiple: true },
  },
});

if (positionals.length !== 1) {
  process.stderr.write("usage: node iothub_connection_string.mjs <iot hub connection string> [--count N] [--timeout S] [--device ID]...\n");
  process.exit(64);
}

let found;
try {
  found = await eventHubsConnectionString(positionals[0], Number(values.timeout));
} catch (err) {
  emit({ type: "fatal", stage: "redirect", ...describeError(err.linkError ?? err) });
  process.stderr.write(`iothub_connection_string: ${err?.stack ?? err}\n`);
  process.exit(3);
}
emit(found.redirect);

try {
  const result = await readEvents(found.connectionString, {
    count: Number(values.count),
    timeoutS: Number(values.timeout),
    deviceIds: values.device,
  });
  process.exit(result.reason === "count" ? 0 : 2);
} catch (err) {
  emit({ type: "fatal", stage: "read", ...describeError(err) });
  process.stderr.write(`iothub_connection_string: ${err?.stack ?? err}\n`);
  process.exit(1);
}
