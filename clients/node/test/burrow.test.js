'use strict';
// End-to-end checks of the Node client against a running Burrow serving service.example:calc.
// Needs BURROW_AMQP_URL and BURROW_NAMESPACE (tests/integration/test_node_client.py sets them).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const amqp = require('amqplib');
const burrow = require('../burrow.js');

const URL = process.env.BURROW_AMQP_URL;
const NAMESPACE = process.env.BURROW_NAMESPACE;
const skip = !URL || !NAMESPACE ? 'BURROW_AMQP_URL and BURROW_NAMESPACE are not set' : false;
const SCHEMAS = path.join(__dirname, '..', '..', '..', 'schemas');
const WAIT_MS = 15000;

let client;

before(async () => {
  if (!skip) client = await burrow.connect(URL, { namespace: NAMESPACE, defaultTimeoutMs: 10000 });
});

after(async () => {
  if (client) await client.close();
});

// Resolves with the first value `accept` returns for a delivery, or fails after WAIT_MS.
function waiter(accept) {
  let resolve;
  let timer;
  const promise = new Promise((res, rej) => {
    resolve = res;
    timer = setTimeout(() => rej(new Error(`nothing arrived within ${WAIT_MS} ms`)), WAIT_MS);
  }).finally(() => clearTimeout(timer));
  const handler = (payload, meta) => {
    const value = accept(payload, meta);
    if (value !== undefined) resolve(value);
  };
  return { promise, handler };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Whether a queue exists, asked on a connection of its own (a 404 closes the channel; an exclusive
// queue of another connection answers 405 RESOURCE_LOCKED, so it exists).
async function queueExists(name) {
  const connection = await amqp.connect(URL);
  try {
    const ch = await connection.createChannel();
    ch.on('error', () => {});
    try {
      await ch.checkQueue(name);
      return true;
    } catch (err) {
      if (err.code === 404) return false;
      if (err.code === 405) return true;
      throw err;
    }
  } finally {
    await connection.close();
  }
}

test('call calc.add replies with the sum', { skip }, async () => {
  assert.deepEqual(await client.call('calc.add', { a: 1, b: 2 }), { sum: 3 });
});

test('a payload that breaks the schema is a structured INVALID_ARGUMENT from the service', { skip }, async () => {
  const err = await client.call('calc.add', { a: 'x' }).then(
    () => assert.fail('the call should fail'),
    (e) => e,
  );
  assert.ok(err instanceof burrow.errors.InvalidArgument);
  assert.equal(err.code, 'INVALID_ARGUMENT');
  assert.equal(err.retryable, false);
  assert.equal(err.details.reason, 'schema');
  assert.ok(Array.isArray(err.details.errors));
  assert.deepEqual(err.details.errors.map((e) => e.loc).sort(), ['a', 'b']);
  assert.equal(err.details.errors.find((e) => e.loc === 'b').type, 'missing');
});

test('a handler error comes back with its code and details', { skip }, async () => {
  await assert.rejects(client.call('calc.divide', { a: 1, b: 0 }), (err) => {
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.deepEqual(err.details, { field: 'b' });
    return true;
  });
});

test('an unknown operation of a running service is NOT_FOUND', { skip }, async () => {
  await assert.rejects(client.call('calc.nope', {}), (err) => {
    assert.ok(err instanceof burrow.errors.NotFound);
    assert.equal(err.retryable, false);
    return true;
  });
});

test('a route no queue is bound for is returned and read as NOT_FOUND', { skip }, async () => {
  await assert.rejects(client.call('nosuchservice.op', {}), (err) => {
    assert.equal(err.code, 'NOT_FOUND');
    assert.equal(err.details.route, 'nosuchservice.op');
    return true;
  });
  // The channel survives a return: the next call works.
  assert.deepEqual(await client.call('calc.add', { a: 2, b: 2 }), { sum: 4 });
});

test('a call that outlives its timeout fails with a retryable DEADLINE_EXCEEDED', { skip }, async () => {
  await assert.rejects(client.call('calc.slow_square', { x: 2, delay_ms: 3000 }, { timeoutMs: 300 }), (err) => {
    assert.equal(err.code, 'DEADLINE_EXCEEDED');
    assert.equal(err.retryable, true);
    return true;
  });
});

test('with schemasDir a bad payload is refused before publishing, shaped like the service', { skip }, async () => {
  const checked = await burrow.connect(URL, { namespace: NAMESPACE, schemasDir: SCHEMAS });
  try {
    await assert.rejects(checked.call('calc.add', { a: 'x', c: 1 }), (err) => {
      assert.equal(err.code, 'INVALID_ARGUMENT');
      assert.equal(err.details.reason, 'schema');
      assert.deepEqual(err.details.errors.map((e) => e.loc).sort(), ['a', 'b', 'c']);
      return true;
    });
    assert.deepEqual(await checked.call('calc.add', { a: 5, b: 6 }), { sum: 11 });
  } finally {
    await checked.close();
  }
});

test('submit returns a job id whose completion event and pushed result carry the square', { skip }, async () => {
  let jobId;
  const completion = waiter((payload, meta) => (jobId && meta.jobId === jobId ? { payload, meta } : undefined));
  const subscription = await client.subscribe('calc.slow_square.completed', completion.handler);
  const trace = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
  jobId = await client.submit('calc.slow_square', { x: 7, delay_ms: 50 }, { traceparent: trace });
  assert.match(jobId, /^[A-Za-z0-9_-]{1,64}$/);
  const { payload, meta } = await completion.promise;
  assert.deepEqual(payload, { square: 49 });
  assert.equal(meta.correlationId, jobId);
  assert.equal(meta.status, 'ok');
  assert.equal(meta.name, 'calc.slow_square.completed');
  assert.equal(meta.traceparent.slice(0, 36), trace.slice(0, 36), 'the completion continues the trace');
  assert.deepEqual(await client.result(jobId, { timeoutMs: WAIT_MS }), { square: 49 });
  await subscription.cancel();
});

test('a submitter reads its result from the pushed completion, kept until read, with no result call', { skip }, async () => {
  const own = await burrow.connect(URL, { namespace: NAMESPACE });
  try {
    const late = own.lateReplies;
    const jobId = await own.submit('calc.add', { a: 20, b: 22 });
    await sleep(500); // the fast job's completion arrives long before it is asked for
    assert.equal(own.lateReplies, late, 'the completion was matched to its job, not dropped');
    own.readJob = () => assert.fail('a pushed result must not be read with a result call');
    assert.deepEqual(await own.result(jobId, { timeoutMs: WAIT_MS }), { sum: 42 });
    assert.deepEqual(await own.result(jobId, { timeoutMs: WAIT_MS, forget: true }), { sum: 42 });
  } finally {
    await own.close();
  }
});

test('a failed job rejects result() with the error subclass of its code', { skip }, async () => {
  const jobId = await client.submit('calc.divide', { a: 1, b: 0 });
  await assert.rejects(client.result(jobId, { timeoutMs: WAIT_MS, forget: true }), (err) => {
    assert.ok(err instanceof burrow.errors.InvalidArgument);
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.equal(err.retryable, false);
    assert.deepEqual(err.details, { field: 'b' });
    return true;
  });
});

test('submit declares no queue per job: no <ns>.job.<id> exists while the job runs', { skip }, async () => {
  const jobId = await client.submit('calc.slow_square', { x: 3, delay_ms: 1000 });
  assert.equal(await queueExists(`${NAMESPACE}.job.${jobId}`), false);
  assert.deepEqual(await client.result(jobId, { timeoutMs: WAIT_MS, forget: true }), { square: 9 });
  assert.equal(await queueExists(`${NAMESPACE}.job.${jobId}`), false);
});

test('another connection reads a foreign job by id and route through result calls', { skip }, async () => {
  const reader = await burrow.connect(URL, { namespace: NAMESPACE });
  try {
    const ok = await client.submit('calc.slow_square', { x: 12, delay_ms: 1000 });
    const failed = await client.submit('calc.divide', { a: 5, b: 0 });
    // Without the route the reader cannot know which service to ask.
    await assert.rejects(reader.result(ok, { timeoutMs: 500 }), (err) => err.code === 'INVALID_ARGUMENT');
    const states = [];
    const readJob = reader.readJob.bind(reader);
    reader.readJob = async (...args) => {
      const record = await readJob(...args);
      states.push(record ? record.state : 'not found');
      return record;
    };
    // Read while it runs: the reader polls through `running` to `completed`.
    assert.deepEqual(await reader.result(ok, { route: 'calc.slow_square', timeoutMs: WAIT_MS }), { square: 144 });
    assert.ok(states.includes('running'), `states read: ${states}`);
    assert.equal(states.at(-1), 'completed');
    await assert.rejects(reader.result(failed, { route: 'calc.divide', timeoutMs: WAIT_MS }), (err) => {
      assert.ok(err instanceof burrow.errors.InvalidArgument);
      assert.deepEqual(err.details, { field: 'b' });
      return true;
    });
    // The submitter still has its own pushed copies.
    assert.deepEqual(await client.result(ok, { timeoutMs: WAIT_MS, forget: true }), { square: 144 });
    await assert.rejects(client.result(failed, { timeoutMs: WAIT_MS, forget: true }), (err) => err.code === 'INVALID_ARGUMENT');
  } finally {
    await reader.close();
  }
});

test('a result read of an unknown job id is NOT_FOUND once the timeout passes', { skip }, async () => {
  const started = Date.now();
  await assert.rejects(client.result(`node-unknown-${Date.now()}`, { route: 'calc.add', timeoutMs: 400 }), (err) => {
    assert.ok(err instanceof burrow.errors.NotFound);
    assert.equal(err.retryable, false);
    return true;
  });
  assert.ok(Date.now() - started < 5000, 'it gives up near its timeout');
});

test('after the channel is lost the submitter reads its result with result calls', { skip }, async () => {
  const own = await burrow.connect(URL, { namespace: NAMESPACE });
  try {
    const jobId = await own.submit('calc.slow_square', { x: 5, delay_ms: 800 });
    let reads = 0;
    const readJob = own.readJob.bind(own);
    own.readJob = (...args) => {
      reads += 1;
      return readJob(...args);
    };
    // The reply address of this channel dies with it: the push can no longer arrive.
    await own.channel.close();
    assert.deepEqual(await own.result(jobId, { timeoutMs: WAIT_MS }), { square: 25 });
    assert.ok(reads >= 1, 'the result came from result calls');
    // Once read, the client keeps it: no further result call.
    const before = reads;
    assert.deepEqual(await own.result(jobId, { timeoutMs: WAIT_MS }), { square: 25 });
    assert.equal(reads, before);
  } finally {
    await own.close();
  }
});

test('forget drops the client’s copy; the service still answers a read by id and route', { skip }, async () => {
  const jobId = await client.submit('calc.add', { a: 1, b: 1 });
  assert.deepEqual(await client.result(jobId, { timeoutMs: WAIT_MS, forget: true }), { sum: 2 });
  await assert.rejects(client.result(jobId, { timeoutMs: 200 }), (err) => err.code === 'INVALID_ARGUMENT');
  assert.deepEqual(await client.result(jobId, { route: 'calc.add', timeoutMs: WAIT_MS }), { sum: 2 });
});

test('a submit to a service nobody runs is NOT_FOUND and leaves nothing to read', { skip }, async () => {
  const jobId = 'node-test-unrouted-' + Date.now();
  await assert.rejects(client.submit('nosuchservice.op', {}, { jobId }), (err) => err.code === 'NOT_FOUND');
  await assert.rejects(client.result(jobId, { timeoutMs: 200 }), (err) => err.code === 'INVALID_ARGUMENT');
  assert.equal(await queueExists(`${NAMESPACE}.job.${jobId}`), false);
});

test('an emitted event arrives through the client’s own subscription', { skip }, async () => {
  const x = Math.floor(Math.random() * 1e6) + 1000;
  const got = waiter((payload, meta) => (payload.x === x ? { payload, meta } : undefined));
  const subscription = await client.subscribe('calc.square.*', got.handler);
  assert.equal(await client.emit('calc.square.computed', { x, square: x * x }), true);
  const { payload, meta } = await got.promise;
  assert.deepEqual(payload, { x, square: x * x });
  assert.equal(meta.name, 'calc.square.computed');
  await subscription.cancel();
  assert.equal(await queueExists(subscription.queue), false);
});

test('an event nobody subscribed to is reported as not routed', { skip }, async () => {
  assert.equal(await client.emit('nobody.listens.here', { n: 1 }), false);
});

test('close() leaves no queue of the client behind', { skip }, async () => {
  const own = await burrow.connect(URL, { namespace: NAMESPACE });
  let subscription;
  try {
    subscription = await own.subscribe('#', () => {});
    assert.equal(await queueExists(subscription.queue), true);
    assert.deepEqual(await own.call('calc.add', { a: 0, b: 0 }), { sum: 0 });
  } finally {
    await own.close();
  }
  assert.equal(await queueExists(subscription.queue), false);
  await assert.rejects(own.call('calc.add', { a: 1, b: 1 }), (err) => err.code === 'UNAVAILABLE');
});
