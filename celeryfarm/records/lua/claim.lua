-- uses: touch.lua, forged.lua
-- Claim one execution of a step: it starts only if its fencing token (attempt, dispatch,
-- step) is current, the job may still run, and no other execution holds a live lease.
-- KEYS[1] job hash          KEYS[2] leases (zset)      KEYS[3] the job's events (list)
-- KEYS[4] awaiting (zset): the step no longer awaits a node
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] step              ARGV[5] lease owner        ARGV[6] node
-- ARGV[7] lease (ms)        ARGV[8] states a claim may leave (comma-separated)
-- ARGV[9] the state of a job whose step runs
-- KEYS[5] limits (hash: name -> units)   KEYS[6] limit holders (zset of 'name|job id')
-- KEYS[7] retries (zset)    ARGV[10] how long (ms) a limited step waits before it is sent
--                                    again
-- KEYS[8] the owner's change feed (zset): a step that starts changes the job's listing
-- ARGV[11] the commands of the step's message, from its step on (a JSON list of argv
--          lists; '' checks none): anyone who may push to a queue can forge a message, so
--          one whose commands are not the record's (the first line of its history, or its
--          'commands' field for a record from before) changes nothing and is 'forged'
-- A step holds one unit of each of the job's limits (its 'limits' field, comma-separated)
-- while its lease is live: a holder whose lease has expired or gone is dropped here, so a
-- dead node's unit comes back with its lease. A step over a limit is not run: the job is
-- re-dispatched into the retries set (so it no longer awaits a node: it is sent again
-- from there), and the claim answers 'limited'.
-- Returns {status, detail} with a ClaimStatus, and for 'ok' the record (HGETALL) third and
-- its history fourth (its first line has the commands), so the step needs no second read.
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'next_step',
                     'lease_owner')
if not f[1] then return {'gone', ''} end
local forged = ARGV[11] ~= '' and not_sent(KEYS[1], KEYS[3], tonumber(ARGV[4]), ARGV[11])
if forged then return {'forged', forged} end
if f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then
  return {'superseded', 'the job is on attempt ' .. f[2] .. ', dispatch ' .. f[3]}
end
if not is_one_of(ARGV[8], f[1]) then return {'finished', 'the job is ' .. f[1]} end
if f[4] ~= ARGV[4] then return {'done', 'the next step is ' .. f[4]} end
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if f[5] and deadline and tonumber(deadline) > now then
  return {'duplicate', 'the step is running as ' .. f[5]}
end
local limits = redis.call('HGET', KEYS[1], 'limits') or ''
for name in string.gmatch(limits, '[^,]+') do
  local units = tonumber(redis.call('HGET', KEYS[5], name) or '-1')
  if units >= 0 then
    local held = 0
    for _, holder in ipairs(redis.call('ZRANGEBYLEX', KEYS[6], '[' .. name .. '|',
                                       '(' .. name .. '}')) do
      local job = string.sub(holder, #name + 2)
      local lease = redis.call('ZSCORE', KEYS[2], job)
      if lease and tonumber(lease) > now then
        if job ~= ARGV[1] then held = held + 1 end
      else
        redis.call('ZREM', KEYS[6], holder)
      end
    end
    if held >= units then
      redis.call('HSET', KEYS[1], 'dispatch', tonumber(f[3]) + 1)
      redis.call('ZADD', KEYS[7], now + tonumber(ARGV[10]), ARGV[1])
      redis.call('ZREM', KEYS[4], ARGV[1])
      add_event(KEYS[3], ARGV[1], {event = 'limited', limit = name,
        step = tonumber(ARGV[4]), dispatch = tonumber(ARGV[3]), attempt = tonumber(ARGV[2]),
        node = ARGV[6], at = now})
      return {'limited', name .. ': ' .. held .. ' of ' .. units .. ' in use'}
    end
  end
end
for name in string.gmatch(limits, '[^,]+') do
  redis.call('ZADD', KEYS[6], 0, name .. '|' .. ARGV[1])
end
redis.call('HSET', KEYS[1], 'state', ARGV[9], 'step', ARGV[4], 'node', ARGV[6],
           'lease_owner', ARGV[5])
redis.call('HSETNX', KEYS[1], 'start', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
add_event(KEYS[3], ARGV[1], {event = 'start', step = tonumber(ARGV[4]),
  dispatch = tonumber(ARGV[3]), attempt = tonumber(ARGV[2]), owner = ARGV[5], at = now})
touch(KEYS[8], ARGV[1])
local history = ''
if redis.call('TYPE', KEYS[3]).ok == 'string' then history = redis.call('GET', KEYS[3]) end
return {'ok', '', redis.call('HGETALL', KEYS[1]), history}
