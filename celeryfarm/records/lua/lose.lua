-- Prepended to the scripts that lose a step (reap.lua, rescue.lua).
-- lose(job, events, outbox, leases, id, f, max_lost, hold_ms, cause, stats) records that
-- the job's current step was lost: a count in stats ('lease_losses'), an event and a new
-- dispatch in the outbox (the caller sends it);
-- or, after max_lost losses in a row, 'failing': the job fails only once the caller has
-- said why in the render log (fail_lost.lua), because clients read the log as soon as a job
-- has ended. Until then the caller holds the step's lease for hold_ms as the owner it is
-- given ('failing:' and the lost owner), so no one else reaps, claims or renews it; if the
-- caller dies, the hold expires and the next reaper loses the step again, and fails the job.
-- f holds LOSE_FIELDS of the job hash. Returns {id, outcome, step, node, lost, cause}, and
-- for 'failing' the hold's owner and the attempt too.
local LOSE_FIELDS = {'state', 'dispatch', 'next_step', 'lost', 'node', 'lease_owner', 'attempt'}
local FAILING = 'failing:'

local function lose(job, events, outbox, leases, id, f, max_lost, hold_ms, cause, stats)
  local lost = tonumber(f[4] or '0') + 1
  redis.call('HINCRBY', stats, 'lease_losses', 1)
  local node = f[5] or ''
  if lost >= max_lost then
    local hold = f[6] or ''
    if string.sub(hold, 1, #FAILING) ~= FAILING then hold = FAILING .. hold end
    redis.call('HSET', job, 'lease_owner', hold)
    redis.call('ZADD', leases, now + hold_ms, id)
    return {id, 'failing', f[3], node, tostring(lost), cause, hold, f[7]}
  end
  add_event(events, id, {event = 'lost',
    step = tonumber(f[3]), dispatch = tonumber(f[2]), attempt = tonumber(f[7]),
    owner = f[6] or '', node = node, lost = lost, at = now})
  redis.call('HDEL', job, 'lease_owner')
  compact_record(job)
  redis.call('HSET', job, 'dispatch', tonumber(f[2]) + 1, 'lost', lost, 'node', '')
  redis.call('ZADD', outbox, now, id)
  return {id, 'redispatched', f[3], node, tostring(lost), cause}
end
