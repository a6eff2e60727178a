// Module identities through the official IoT Hub service SDK for Node (azure-iothub, unchanged):
// Registry.addModule / getModule / getModulesOnDevice / updateModule / getModuleTwin /
// updateModuleTwin / removeModule, and Client.invokeDeviceMethod(deviceId, moduleId, params).
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> NODE_EXTRA_CA_CERTS=<hub ca.pem> \
//     node modules_service.mjs registry '<service connection string>' DEVICE MODULE
//     node modules_service.mjs invoke '<service connection string>' DEVICE MODULE METHOD '<json payload>'
//     node modules_service.mjs remove '<service connection string>' DEVICE MODULE
//
// `registry` adds the module (hub-generated keys), reads it back alone and in the device's list,
// adds it again (expecting the SDK's error), updates it with its etag, patches its twin with
// "*" and reads the twin. Every step prints one JSON line {"type": <step>, ...}; an expected
// error prints {"type": "<step>-error", "statusCode", "name", "body"}. A failure prints
// {"type":"fatal"} and exits 1.

import { describeError, emit, requireLocked } from "./lib.mjs";

const [command, connectionString, deviceId, moduleId, ...rest] = process.argv.slice(2);
if (!command || !connectionString || !deviceId || !moduleId) {
  process.stderr.write("usage: node modules_service.mjs registry|invoke|remove CS DEVICE MODULE [...]\n");
  process.exit(64);
}

const { Registry, Client } = requireLocked("azure-iothub");

function httpError(step, err) {
  return {
    type: `${step}-error`,
    statusCode: err?.response?.statusCode ?? null,
    name: err?.name ?? null,
    body: err?.responseBody ?? null,
  };
}

function twinRecord(twin) {
  return {
    deviceId: twin.deviceId,
    moduleId: twin.moduleId ?? null,
    etag: twin.etag,
    tags: twin.tags ?? null,
    desired: twin.properties?.desired ?? null,
    reported: twin.properties?.reported ?? null,
  };
}

async function registry() {
  const reg = Registry.fromConnectionString(connectionString);
  const added = await reg.addModule({ deviceId, moduleId, managedBy: "node" });
  emit({ type: "added", statusCode: added.httpResponse.statusCode, module: added.responseBody });

  const got = await reg.getModule(deviceId, moduleId);
  emit({ type: "got", statusCode: got.httpResponse.statusCode, module: got.responseBody });

  const list = await reg.getModulesOnDevice(deviceId);
  emit({ type: "list", statusCode: list.httpResponse.statusCode, moduleIds: list.responseBody.map((m) => m.moduleId) });

  try {
    await reg.addModule({ deviceId, moduleId });
    emit({ type: "duplicate", statusCode: 200 });
  } catch (err) {
    emit(httpError("duplicate", err));
  }

  const module = got.responseBody;
  module.managedBy = "node-updated";
  const updated = await reg.updateModule(module);
  emit({ type: "updated", statusCode: updated.httpResponse.statusCode, module: updated.responseBody });

  const patched = await reg.updateModuleTwin(
    deviceId,
    moduleId,
    { tags: { lang: "node" }, properties: { desired: { interval: 9 } } },
    "*",
  );
  emit({ type: "twin-patched", statusCode: patched.httpResponse.statusCode, twin: twinRecord(patched.responseBody) });

  const twin = await reg.getModuleTwin(deviceId, moduleId);
  emit({ type: "twin", statusCode: twin.httpResponse.statusCode, twin: twinRecord(twin.responseBody) });

  try {
    await reg.getModule(deviceId, "no-such-module");
    emit({ type: "missing", statusCode: 200 });
  } catch (err) {
    emit(httpError("missing", err));
  }
}

async function invoke() {
  const [methodName, payload] = rest;
  const client = Client.fromConnectionString(connectionString);
  try {
    const res = await client.invokeDeviceMethod(deviceId, moduleId, {
      methodName,
      payload: payload === undefined ? null : JSON.parse(payload),
      responseTimeoutInSeconds: 10,
    });
    emit({ type: "invoked", statusCode: res.message.statusCode, result: res.result });
  } catch (err) {
    emit(httpError("invoke", err));
  } finally {
    await client.close();
  }
}

async function remove() {
  const reg = Registry.fromConnectionString(connectionString);
  const res = await reg.removeModule(deviceId, moduleId);
  emit({ type: "removed", statusCode: res.httpResponse.statusCode });
}

const commands = { registry, invoke, remove };
if (!commands[command]) {
  process.stderr.write(`unknown command ${command}\n`);
  process.exit(64);
}
let rc = 0;
try {
  await commands[command]();
} catch (err) {
  emit({ type: "fatal", ...describeError(err), ...httpError("fatal", err) });
  process.stderr.write(`modules_service: ${err?.stack ?? err}\n`);
  rc = 1;
}
process.exit(rc);
