// useDeploymentWebSocket against the real server: rows written with SQL
// must show up in the views, once each, over one shared socket.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { effectScope, ref } from 'vue'
import type pg from 'pg'
import { createWindflow, useDeploymentWebSocket, type DeploymentWebSocketOptions } from 'windflow-notify-clients/browser'
import * as serverSide from 'windflow-notify-clients'
import {
  connectWriter,
  createDatabase,
  createDeployment,
  recordingWebSocket,
  startServer,
  token,
  until,
  type Database,
  type RecordedSocket,
  type Server,
} from '../support/server.js'

let database: Database
let server: Server
let sql: pg.Client

before(async () => {
  database = await createDatabase()
  server = await startServer(database)
  sql = await connectWriter(database)
})

after(async () => {
  await sql?.end()
  await server?.stop()
  await database?.drop()
})

const log = (id: string, message: string) =>
  sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, message])
const messages = (view: { logs: readonly { message: string }[] }) => view.logs.map((line) => line.message)
const events = (socket: RecordedSocket) => socket.received.filter((m) => typeof m.event_id === 'number')

/** A page: one recording WebSocket and one connection, as `app.use(createWindflow(...))` gives. */
function page(user: string, extra: Partial<DeploymentWebSocketOptions> = {}) {
  const { WebSocket, sockets } = recordingWebSocket()
  const windflow = createWindflow({ url: `ws://127.0.0.1:${server.port}/ws`, token: token(user), WebSocket, idleTimeout: 0, ...extra })
  const scopes = new Map<object, ReturnType<typeof effectScope>>()
  /** Run the composable in its own effect scope, as a component would. */
  const mount = (id: string | (() => string), options: Partial<DeploymentWebSocketOptions> = {}) => {
    const scope = effectScope()
    const view = scope.run(() => useDeploymentWebSocket(id, { windflow, ...options }))!
    scopes.set(view, scope)
    return view
  }
  const unmount = (view: object) => scopes.get(view)?.stop()
  const close = () => {
    for (const scope of scopes.values()) scope.stop()
    windflow.close()
  }
  return { windflow, sockets, mount, unmount, close }
}

describe('useDeploymentWebSocket', () => {
  test('status, progress and logs follow the rows written with SQL', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner, 'web')
    const { mount, close } = page(owner)
    try {
      const view = mount(id)
      await until(() => view.connected, 'connected')
      await until(() => view.status === 'pending' && view.name === 'web', 'the insert, replayed with since 0')
      await sql.query(
        "UPDATE deployments SET status = 'deploying', progress = 40, current_step = 'Pulling images', total_steps = 5 WHERE id = $1",
        [id],
      )
      await until(() => view.status === 'deploying' && view.progress === 40, 'status and progress')
      assert.equal(view.currentStep, 'Pulling images')
      assert.equal(view.totalSteps, 5)
      await log(id, '[INFO] pulled\n[INFO] second line of one row')
      await until(() => view.logs.length === 1, 'the log row')
      assert.equal(view.logs[0].message, '[INFO] pulled\n[INFO] second line of one row', 'one row, one entry')
      assert.equal(typeof view.logs[0].event_id, 'number')
      await sql.query("UPDATE deployments SET status = 'failed', error_message = 'boom' WHERE id = $1", [id])
      await until(() => view.status === 'failed', 'failed')
      assert.equal(view.errorMessage, 'boom')
    } finally {
      close()
    }
  })

  test('history written before mounting is replayed, in order, once', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2), ($1, $2), ($1, $3)', [id, 'same', 'two'])
    await sql.query('UPDATE deployments SET progress = 70 WHERE id = $1', [id])
    const { mount, close } = page(owner)
    try {
      const view = mount(id)
      await until(() => view.logs.length === 3 && view.progress === 70, 'the replayed history')
      assert.deepEqual(messages(view), ['same', 'same', 'two'])
    } finally {
      close()
    }
  })

  test("another deployment's events do not leak in", async () => {
    const owner = randomUUID()
    const watched = await createDeployment(sql, owner, 'watched')
    const other = await createDeployment(sql, owner, 'other')
    const { mount, close } = page(owner)
    try {
      const view = mount(watched)
      await until(() => view.connected, 'connected')
      await log(other, 'not mine')
      await sql.query("UPDATE deployments SET status = 'running', progress = 100 WHERE id = $1", [other])
      await log(watched, 'mine')
      await until(() => view.logs.length === 1, 'the watched deployment’s line')
      assert.deepEqual(messages(view), ['mine'])
      assert.equal(view.status, 'pending')
      assert.equal(view.progress, 0)
    } finally {
      close()
    }
  })

  test('a reactive id switches to the other deployment', async () => {
    const owner = randomUUID()
    const first = await createDeployment(sql, owner, 'first')
    const second = await createDeployment(sql, owner, 'second')
    await log(second, 'second log')
    const id = ref(first)
    const { mount, close } = page(owner)
    try {
      const view = mount(() => id.value)
      await until(() => view.status === 'pending' && view.connected, 'the first deployment')
      id.value = second
      await until(() => view.deploymentId === second && view.logs.length === 1, 'the second deployment’s history')
      assert.deepEqual(messages(view), ['second log'])
      assert.equal(view.name, 'second')
    } finally {
      close()
    }
  })

  test('two views share one socket, and switching replays only the new deployment', async () => {
    const owner = randomUUID()
    const [a, b] = [await createDeployment(sql, owner, 'a'), await createDeployment(sql, owner, 'b')]
    // History the switch must not download: many other deployments of the user's.
    for (let i = 0; i < 20; i += 1) await log(await createDeployment(sql, owner, `noise-${i}`), 'noise')
    await log(b, 'b1')
    await log(b, 'b2')
    const { mount, sockets, close } = page(owner)
    try {
      const id = ref(a)
      const switching = mount(() => id.value)
      const fixed = mount(a)
      await until(() => switching.connected && fixed.connected && fixed.status === 'pending', 'both views')
      assert.equal(sockets.length, 1, 'one socket for the page')
      const before = sockets[0].received.length
      id.value = b
      await until(() => switching.logs.length === 2, 'b’s history')
      await log(b, 'b3')
      await until(() => switching.logs.length === 3, 'b, live')
      const downloaded = events({ ...sockets[0], received: sockets[0].received.slice(before) })
      assert.ok(downloaded.every((m) => (m.data as { deployment_id: string }).deployment_id === b), JSON.stringify(downloaded))
      assert.deepEqual(messages(switching), ['b1', 'b2', 'b3'])
      assert.equal(fixed.status, 'pending', 'the other view still follows a')
      assert.equal(sockets.length, 1)
    } finally {
      close()
    }
  })

  test('a view mounted after its deployment’s events reached the page shows them (the server does not send them twice)', async () => {
    const owner = randomUUID()
    const [a, b] = [await createDeployment(sql, owner, 'a'), await createDeployment(sql, owner, 'b')]
    const { mount, sockets, close } = page(owner)
    try {
      const first = mount(a)
      await until(() => first.connected, 'connected')
      // The owner's socket receives b's events without subscribing.
      await log(b, 'while nobody showed b')
      await until(() => events(sockets[0]).some((m) => (m.data as { logs?: string }).logs === 'while nobody showed b'), 'b’s line on the socket')
      await log(b, 'later')
      const second = mount(b)
      // The lines come from what the page kept; the insert, from before the
      // socket, from the replay.
      await until(() => second.logs.length === 2 && second.status === 'pending', 'b’s lines and status')
      assert.deepEqual(messages(second), ['while nobody showed b', 'later'])
      assert.equal(sockets.length, 1)
    } finally {
      close()
    }
  })

  test('a deployment forgotten while its events arrived is replayed on a fresh socket', async () => {
    const owner = randomUUID()
    const [a, b, c] = [await createDeployment(sql, owner, 'a'), await createDeployment(sql, owner, 'b'), await createDeployment(sql, owner, 'c')]
    const { mount, sockets, close } = page(owner, { keepDeployments: 1 })
    try {
      const first = mount(a)
      await until(() => first.connected, 'connected')
      await log(b, 'b line')
      await log(c, 'c line') // keeps c, forgets b
      await until(() => events(sockets[0]).some((m) => (m.data as { logs?: string }).logs === 'c line'), 'c’s line')
      const second = mount(b)
      await until(() => second.logs.length === 1 && second.connected, 'b’s line')
      assert.deepEqual(messages(second), ['b line'])
      assert.equal(sockets.length, 2, 'a new socket: the old one had b’s line already')
      assert.ok(sockets[0].closed)
    } finally {
      close()
    }
  })

  test('a deployment the user may not see is forbidden, and no reconnect asks for it again', async () => {
    const owner = randomUUID()
    const theirs = await createDeployment(sql, randomUUID())
    const mine = await createDeployment(sql, owner)
    const { mount, sockets, windflow, close } = page(owner)
    try {
      const refused = mount(theirs)
      const allowed = mount(mine)
      await until(() => refused.state === 'forbidden', 'forbidden')
      assert.equal(refused.error?.code, 'forbidden')
      assert.equal(refused.connected, false)
      assert.equal(refused.status, null)
      await until(() => allowed.status === 'pending', 'the other view')
      windflow.reconnect()
      await until(() => sockets.length === 2 && allowed.connected, 'the reconnect')
      // The reconnect names its topics in `auth` (resume at connect), and subscribes nothing after.
      const auth = sockets[1].sent.find((m) => m.type === 'auth')
      const topics = (auth?.topics ?? []) as string[]
      assert.equal(topics.length, 3, `the deployment's three topics: ${topics}`)
      assert.ok(topics.every((topic) => topic.endsWith(mine)), `only its own deployment: ${topics}`)
      assert.equal(sockets[1].sent.filter((m) => m.type === 'subscribe').length, 0)
      assert.equal(refused.state, 'forbidden')
    } finally {
      close()
    }
  })

  test('a refused token given as a function: unauthorized, and no socket until the function gives another token', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    let current = 'not-a-jwt'
    let asked = 0
    const tokenFunction = () => {
      asked += 1
      return current
    }
    const { mount, sockets, close } = page(owner, { token: tokenFunction, minDelay: 5, maxDelay: 20 })
    try {
      const view = mount(id)
      await until(() => view.state === 'unauthorized', 'unauthorized')
      assert.equal(view.error?.code, 'unauthorized')
      const seen = asked
      await until(() => asked >= seen + 5, 'the token function, asked again')
      assert.equal(sockets.length, 1, 'the refused token is not tried again')
      current = token(owner)
      await until(() => view.connected && view.status === 'pending', 'connected with the fresh token')
      assert.equal(view.error, null)
      assert.equal(sockets.length, 2)
    } finally {
      close()
    }
  })

  test('initial values and lines show until events arrive, and each line once after the replay', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    await log(id, 'one')
    await log(id, 'two')
    const earlier = page(owner)
    let kept: ReturnType<typeof earlier.mount>['logs'] = []
    try {
      const view = earlier.mount(id)
      await until(() => view.logs.length === 2, 'the first visit')
      kept = [...view.logs]
    } finally {
      earlier.close()
    }
    await log(id, 'three')
    // A view shown again, given the lines it had (with their ids).
    const again = page(owner)
    // And one given the REST API's lines (no ids), and a status.
    const fromApi = page(owner)
    try {
      const withIds = again.mount(id, { initial: { logs: kept } })
      assert.deepEqual(messages(withIds), ['one', 'two'], 'shown at once')
      const rest = [{ message: 'one', timestamp: kept[0].timestamp }, { message: 'two', timestamp: kept[1].timestamp }]
      const withoutIds = fromApi.mount(id, { initial: { status: 'deploying', progress: 10, logs: rest } })
      assert.equal(withoutIds.status, 'deploying')
      assert.deepEqual(messages(withoutIds), ['one', 'two'])
      for (const view of [withIds, withoutIds]) {
        await until(() => view.logs.length === 3 && view.connected, 'the replay')
        assert.deepEqual(messages(view), ['one', 'two', 'three'])
        assert.ok(view.logs.every((line) => typeof line.event_id === 'number'))
      }
      await until(() => withoutIds.status === 'pending', 'the replayed status replaces the initial one')
    } finally {
      again.close()
      fromApi.close()
    }
  })

  test('the log keeps maxLogEntries, the newest, and says it dropped some', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    for (let i = 1; i <= 5; i += 1) await log(id, `line ${i}`)
    const { mount, close } = page(owner, { maxLogEntries: 3 })
    try {
      const view = mount(id)
      await until(() => view.logs.at(-1)?.message === 'line 5', 'the newest line')
      assert.deepEqual(messages(view), ['line 3', 'line 4', 'line 5'])
      assert.equal(view.logsTruncated, true)
    } finally {
      close()
    }
  })

  test('unmounting the last view closes the socket', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    const { mount, unmount, sockets, windflow, close } = page(owner)
    try {
      const view = mount(id)
      await until(() => view.connected, 'connected')
      unmount(view)
      assert.equal(view.connected, false)
      assert.equal(view.state, 'closed')
      await until(() => sockets[0].closed && windflow.state === 'closed', 'the socket closed')
    } finally {
      close()
    }
  })

  test('closing the app’s connection, then a view that needs it: every view follows again', async () => {
    // A colleague's deployments: their events come by subscription only.
    const org = randomUUID()
    const create = async (name: string) =>
      (await sql.query('INSERT INTO deployments (user_id, organization_id, name) VALUES ($1, $2, $3) RETURNING id', [randomUUID(), org, name]))
        .rows[0].id as string
    const [a, b] = [await create('a'), await create('b')]
    const member = randomUUID()
    const { mount, sockets, windflow, close } = page(member, { token: token(member, { organizationId: org }) })
    try {
      const id = ref(a)
      const fixed = mount(a)
      const switching = mount(() => id.value)
      await until(() => fixed.connected && switching.connected, 'both views')
      windflow.close()
      assert.equal(fixed.state, 'closed')
      id.value = b
      await until(() => fixed.connected && switching.connected && switching.status === 'pending', 'both views, again')
      await log(a, 'for the view that stayed')
      await until(() => fixed.logs.length === 1, 'its line')
      assert.equal(sockets.length, 2)
    } finally {
      close()
    }
  })

  test('views given the same token share one socket without a provider', async () => {
    const owner = randomUUID()
    const [a, b] = [await createDeployment(sql, owner), await createDeployment(sql, owner)]
    const { WebSocket, sockets } = recordingWebSocket()
    const options = { url: `ws://127.0.0.1:${server.port}/ws`, token: token(owner), WebSocket, idleTimeout: 0 }
    const scope = effectScope()
    try {
      const [first, second] = scope.run(() => [useDeploymentWebSocket(a, options), useDeploymentWebSocket(b, options)])!
      await until(() => first.connected && second.connected && second.status === 'pending', 'both views')
      assert.equal(sockets.length, 1)
    } finally {
      scope.stop()
    }
  })
})

describe('outside a browser', () => {
  test('the server-side entry shows initial values and opens nothing', async () => {
    const { WebSocket, sockets } = recordingWebSocket()
    const view = serverSide.useDeploymentWebSocket(randomUUID(), {
      url: `ws://127.0.0.1:${server.port}/ws`,
      token: () => assert.fail('no token is asked for'),
      WebSocket,
      initial: { status: 'running', progress: 50, logs: [{ message: 'from the API', timestamp: '2030-01-01T00:00:00Z' }] },
    })
    assert.equal(view.status, 'running')
    assert.equal(view.progress, 50)
    assert.deepEqual(messages(view), ['from the API'])
    assert.equal(view.state, 'closed')
    assert.equal(sockets.length, 0)
    assert.equal(serverSide.createWindflow({ token: 't' }).state, 'closed')
  })

  test('the browser entry without a browser or a WebSocket opens nothing either', () => {
    const scope = effectScope()
    try {
      const view = scope.run(() =>
        useDeploymentWebSocket(randomUUID(), { token: () => assert.fail('no token is asked for'), initial: { status: 'failed' } }),
      )!
      assert.equal(view.status, 'failed')
      assert.equal(view.state, 'closed')
    } finally {
      scope.stop()
    }
  })
})

describe('across a server restart', () => {
  test('reconnects and catches up with what was written while it was down', async () => {
    const local = await createDatabase()
    let restarted: Server | null = null
    const first = await startServer(local)
    const writer = await connectWriter(local)
    const owner = randomUUID()
    const id = await createDeployment(writer, owner)
    const { WebSocket } = recordingWebSocket()
    const scope = effectScope()
    const view = scope.run(() =>
      useDeploymentWebSocket(id, { url: `ws://127.0.0.1:${first.port}/ws`, token: token(owner), WebSocket, idleTimeout: 0 }),
    )!
    try {
      await until(() => view.status === 'pending' && view.connected, 'connected')
      await writer.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, 'before'])
      await until(() => view.logs.length === 1, 'the first line')
      await first.stop()
      await until(() => !view.connected, 'the disconnect')
      await writer.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, 'while down'])
      await writer.query("UPDATE deployments SET status = 'running', progress = 100 WHERE id = $1", [id])
      restarted = await startServer(local, { port: first.port })
      await until(() => view.connected, 'the reconnect')
      await until(() => view.logs.length === 2, 'the missed line')
      assert.deepEqual(messages(view), ['before', 'while down'])
      await until(() => view.status === 'running' && view.progress === 100, 'the missed status')
      await writer.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, 'after'])
      await until(() => view.logs.length === 3, 'live again')
      assert.deepEqual(messages(view), ['before', 'while down', 'after'])
    } finally {
      scope.stop()
      await writer.end()
      await restarted?.stop()
      await first.stop()
      await local.drop()
    }
  })
})
