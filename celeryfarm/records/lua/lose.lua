-- Prepended to the scripts that lose a step (reap.lua, rescue.lua).
-- lose(job, events, outbox, id, f, max_lost, failed, cause, stats) records that the job's
-- current step was lost: an event, a count in stats ('lease_losses'), and either a new
-- dispatch in the outbox (the caller sends it) or, after max_lost losses in a row, the job
-- in state `failed`.
-- f holds LOSE_FIELDS of the job hash. Returns {id, outcome, step, node, lost, cause}.
local LOSE_FIELDS = {'state', 'dispatch', 'next_step', 'lost', 'node', 'lease_owner', 'attempt'}

local function lose(job, events, outbox, id, f, max_lost, failed, cause, stats)
  local lost = tonumber(f[4] or '0') + 1
  redis.call('HINCRBY', stats, 'lease_losses', 1)
  local node = f[5] or ''
  redis.call('RPUSH', events, cjson.encode({event = 'lost',
    step = tonumber(f[3]), dispatch = tonumber(f[2]), attempt = tonumber(f[7]),
    owner = f[6] or '', node = node, lost = lost, at = now}))
  redis.call('HDEL', job, 'lease_owner')
  if lost >= max_lost then
    redis.call('HSET', job, 'state', failed, 'end', now, 'lost', lost, 'reason',
      'step ' .. (tonumber(f[3]) + 1) .. ' was lost on ' .. lost .. ' nodes in a row')
    return {id, 'failed', f[3], node, tostring(lost), cause}
  end
  redis.call('HSET', job, 'dispatch', tonumber(f[2]) + 1, 'lost', lost, 'node', '')
  redis.call('ZADD', outbox, now, id)
  return {id, 'redispatched', f[3], node, tostring(lost), cause}
end
