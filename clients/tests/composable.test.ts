// useDeploymentWebSocket against the real server: rows written with SQL
// must show up in the composable's refs.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { effectScope, ref } from 'vue'
import WebSocket from 'ws'
import type pg from 'pg'
import { useDeploymentWebSocket, type DeploymentWebSocketOptions } from '../src/index.js'
import {
  connectWriter,
  createDatabase,
  createDeployment,
  startServer,
  token,
  until,
  type Database,
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

/** Run the composable in its own effect scope, as a component would. */
function mount(id: string | (() => string), user: string, extra: Partial<DeploymentWebSocketOptions> = {}) {
  const scope = effectScope()
  const state = scope.run(() =>
    useDeploymentWebSocket(id, { url: `ws://127.0.0.1:${server.port}/ws`, token: token(user), WebSocket, ...extra }),
  )!
  return { ...state, unmount: () => scope.stop() }
}

describe('useDeploymentWebSocket', () => {
  test('status, progress and logs follow the rows written with SQL', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner, 'web')
    const view = mount(id, owner)
    try {
      await until(() => view.connected.value, 'connected')
      await until(() => view.status.value === 'pending', 'the insert, replayed with since 0')
      await sql.query(
        "UPDATE deployments SET status = 'deploying', progress = 40, current_step = 'Pulling images', total_steps = 5 WHERE id = $1",
        [id],
      )
      await until(() => view.status.value === 'deploying' && view.progress.value === 40, 'status and progress')
      assert.equal(view.currentStep.value, 'Pulling images')
      assert.equal(view.totalSteps.value, 5)
      await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, '[INFO] pulled'])
      await until(() => view.logs.value === '[INFO] pulled\n', 'the log line')
      await sql.query("UPDATE deployments SET status = 'failed', error_message = 'boom' WHERE id = $1", [id])
      await until(() => view.status.value === 'failed', 'failed')
      assert.equal(view.errorMessage.value, 'boom')
    } finally {
      view.unmount()
    }
  })

  test('history written before mounting is replayed', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2), ($1, $3)', [id, 'one', 'two'])
    await sql.query('UPDATE deployments SET progress = 70 WHERE id = $1', [id])
    const view = mount(id, owner)
    try {
      await until(() => view.logs.value === 'one\ntwo\n' && view.progress.value === 70, 'the replayed history')
    } finally {
      view.unmount()
    }
  })

  test("another deployment's events do not leak in", async () => {
    const owner = randomUUID()
    const watched = await createDeployment(sql, owner, 'watched')
    const other = await createDeployment(sql, owner, 'other')
    const view = mount(watched, owner)
    try {
      await until(() => view.connected.value, 'connected')
      await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [other, 'not mine'])
      await sql.query("UPDATE deployments SET status = 'running', progress = 100 WHERE id = $1", [other])
      await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [watched, 'mine'])
      await until(() => view.logs.value === 'mine\n', 'the watched deployment’s line')
      assert.equal(view.status.value, 'pending')
      assert.equal(view.progress.value, 0)
    } finally {
      view.unmount()
    }
  })

  test('a reactive id switches to the other deployment', async () => {
    const owner = randomUUID()
    const first = await createDeployment(sql, owner, 'first')
    const second = await createDeployment(sql, owner, 'second')
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [second, 'second log'])
    const id = ref(first)
    const view = mount(() => id.value, owner)
    try {
      await until(() => view.status.value === 'pending' && view.connected.value, 'the first deployment')
      id.value = second
      await until(() => view.logs.value === 'second log\n', 'the second deployment’s history')
    } finally {
      view.unmount()
    }
  })

  test('a deployment the user may not see is refused', async () => {
    const id = await createDeployment(sql, randomUUID())
    const view = mount(id, randomUUID())
    try {
      await until(() => view.lastError.value?.code === 'forbidden', 'forbidden')
      assert.equal(view.status.value, null)
    } finally {
      view.unmount()
    }
  })

  test('unmounting closes the connection', async () => {
    const owner = randomUUID()
    const id = await createDeployment(sql, owner)
    const view = mount(id, owner)
    await until(() => view.connected.value, 'connected')
    view.unmount()
    assert.equal(view.connected.value, false)
    assert.equal(view.state.value, 'closed')
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
    const scope = effectScope()
    const view = scope.run(() =>
      useDeploymentWebSocket(id, { url: `ws://127.0.0.1:${first.port}/ws`, token: token(owner), WebSocket }),
    )!
    try {
      await until(() => view.status.value === 'pending' && view.connected.value, 'connected')
      await writer.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, 'before'])
      await until(() => view.logs.value === 'before\n', 'the first line')
      await first.stop()
      await until(() => !view.connected.value, 'the disconnect')
      await writer.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, 'while down'])
      await writer.query("UPDATE deployments SET status = 'running', progress = 100 WHERE id = $1", [id])
      restarted = await startServer(local, { port: first.port })
      await until(() => view.connected.value, 'the reconnect')
      await until(() => view.logs.value === 'before\nwhile down\n', 'the missed line, exactly once')
      await until(() => view.status.value === 'running' && view.progress.value === 100, 'the missed status')
      await writer.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, 'after'])
      await until(() => view.logs.value === 'before\nwhile down\nafter\n', 'live again')
    } finally {
      scope.stop()
      await writer.end()
      await restarted?.stop()
      await first.stop()
      await local.drop()
    }
  })
})
