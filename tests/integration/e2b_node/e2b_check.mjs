// The official e2b npm package against corral: create, commands, files, kill.
// Run by tests/integration/test_e2b_node.py with E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL set;
// prints one JSON object of what it saw and exits non-zero on any failure.
import assert from "node:assert/strict";
import { CommandExitError, Sandbox } from "e2b";

const seen = {};
const sbx = await Sandbox.create({ metadata: { from: "node" }, envs: { GREETING: "hej" }, timeoutMs: 120_000 });
try {
  const chunks = [];
  const r = await sbx.commands.run("echo $GREETING; whoami; echo warn >&2", {
    onStdout: (d) => chunks.push(d),
  });
  assert.equal(r.exitCode, 0);
  assert.equal(r.stdout, "hej\nuser\n");
  assert.equal(r.stderr, "warn\n");
  assert.equal(chunks.join(""), "hej\nuser\n");
  seen.stdout = r.stdout;

  await assert.rejects(sbx.commands.run("exit 4"), (e) => e instanceof CommandExitError && e.exitCode === 4);

  const bg = await sbx.commands.run("sleep 60", { background: true });
  const pids = (await sbx.commands.list()).map((p) => p.pid);
  assert.ok(pids.includes(bg.pid));
  assert.equal(await sbx.commands.kill(bg.pid), true);

  await sbx.files.write("/tmp/node/hello.txt", "from node");
  assert.equal(await sbx.files.read("/tmp/node/hello.txt"), "from node");
  const bytes = new Uint8Array([0, 1, 2, 250, 255]);
  await sbx.files.write("/tmp/node/bytes.bin", bytes);
  assert.deepEqual(new Uint8Array(await sbx.files.read("/tmp/node/bytes.bin", { format: "bytes" })), bytes);
  const names = (await sbx.files.list("/tmp/node")).map((e) => e.name).sort();
  assert.deepEqual(names, ["bytes.bin", "hello.txt"]);
  assert.equal(await sbx.files.exists("/tmp/node/none"), false);
  seen.files = names;

  const info = await Sandbox.getInfo(sbx.sandboxId);
  assert.deepEqual(info.metadata, { from: "node" });
  seen.sandboxId = sbx.sandboxId;
} finally {
  await sbx.kill();
}
assert.equal(await sbx.isRunning(), false);
console.log(JSON.stringify(seen));
