// The monitor's own commands and objects: qmp_capabilities, query-version, query-commands,
// query-status, quit, object-add, object-del; lockstep's x-query-event-loop-delay.

import { command, type QmpCommand } from '../dispatch.js';
import { NO_ARGS, OBJECT_ADD, OBJECT_DEL, QMP_CAPABILITIES, X_QUERY_EVENT_LOOP_DELAY } from '../schema/misc.js';


export const miscCommands: readonly QmpCommand[] = [
  // Negotiation itself is the server's business (server.ts); this entry validates the
  // arguments and records oob.
  command('qmp_capabilities', QMP_CAPABILITIES, (_ctx, args, session) => {
    session.oob = args.enable?.includes('oob') ?? false;
    return {};
  }),
  command('query-version', NO_ARGS, (ctx) => ctx.version),
  command('query-commands', NO_ARGS, (ctx) => ctx.dispatcher.names().map((name) => ({ name }))),
  // lockstep's own: the daemon's event-loop delay since start or the last reset (reset=true
  // starts a new measurement after this answer)
  command('x-query-event-loop-delay', X_QUERY_EVENT_LOOP_DELAY, (ctx, args) => {
    const r = ctx.loopDelay.report();
    if (args.reset === true) ctx.loopDelay.reset();
    return r;
  }),
  command('query-status', NO_ARGS, () => ({ status: 'running', singlestep: false, running: true })),
  command('quit', NO_ARGS, (ctx) => {
    ctx.requestShutdown('host-qmp-quit');
    return {};
  }),
  command('object-add', OBJECT_ADD, (ctx, args) => {
    const obj = ctx.objects.add(args);
    ctx.log.info('object added', { id: obj.id, type: obj.qomType });
    return {};
  }),
  command('object-del', OBJECT_DEL, (ctx, args) => {
    ctx.objects.del(args.id);
    ctx.log.info('object deleted', { id: args.id });
    return {};
  }),
];
