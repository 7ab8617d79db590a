// The E2B core loop with the JS SDK (`e2b` from npm, run by Debian's node), pointed at kiln by the
// environment (E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL). Each check prints one JSON line.
import { Sandbox, CommandExitError } from 'e2b'

const check = (check, ok, detail = '') => console.log(JSON.stringify({ check, ok: Boolean(ok), detail: String(detail) }))

const sb = await Sandbox.create('base', { timeoutMs: 120_000, metadata: { client: 'js' }, envs: { FROM_CREATE: 'js' } })
try {
  const r = await sb.commands.run('echo $FROM_CREATE; whoami')
  check('run', r.stdout === 'js\nuser\n', r.stdout)
  try {
    await sb.commands.run('exit 6')
    check('exit code', false, 'no error')
  } catch (e) {
    check('exit code', e instanceof CommandExitError && e.exitCode === 6, e)
  }
  await sb.files.write('/home/user/js.txt', 'from node')
  check('files', (await sb.files.read('/home/user/js.txt')) === 'from node' && (await sb.files.exists('/home/user/js.txt')))
  check('list files', JSON.stringify((await sb.files.list('/home/user')).map((e) => e.name)) === '["js.txt"]')
  const h = await sb.commands.run('sleep 60', { background: true })
  check('background kill', (await sb.commands.kill(h.pid)) === true)
} finally {
  await sb.kill()
  check('killed', (await Sandbox.kill(sb.sandboxId)) === false) // a second kill finds nothing
}
