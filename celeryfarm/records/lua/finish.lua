-- uses: observe.lua, frames.lua, touch.lua
-- Record how an execution of a step ended, if it is still the current one: one write per
-- step end, with the step's duration for the farm's histogram and its last frames done.
-- KEYS[1] job hash          KEYS[2] leases (zset)      KEYS[3] the job's events (list)
-- KEYS[4] awaiting (zset)   KEYS[5] stats (hash)       KEYS[6] the attempt's frames done (set)
-- KEYS[7] change feed (zset): a job that ends changes its listing; its frames done (KEYS[6])
--         go then: the count stays in the record
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] step              ARGV[5] lease owner        ARGV[6] outcome (a StepOutcome)
-- ARGV[7] '1': expire the lease now and keep its owner, so a reaper re-dispatches the
--         step at once; '0': release the lease
-- ARGV[8] the next step to run ('' leaves it)
-- ARGV[9] the state to go to ('' leaves it)  ARGV[10] states it may leave (comma-separated)
-- ARGV[11] why the job ends ('' none)
-- ARGV[12] states in which the next step then awaits a node ('' when there is none): Celery
--          sends it only once the task has returned, so from now on the reapers look for it
-- ARGV[13] how long the render ran (s; '' when it never ran)   ARGV[14] the histogram's
--          bucket bounds (comma-separated)
-- ARGV[15..] frames the step reported done since its last lease renewal
-- Returns 1 if recorded, 0 if the execution was no longer current (a superseded node).
observe(KEYS[5], ARGV[13], ARGV[14])
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'lease_owner')
if f[4] ~= ARGV[5] or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return 0 end
add_frames(KEYS[1], KEYS[6], 15)
add_event(KEYS[3], ARGV[1], {event = 'end', outcome = ARGV[6],
  step = tonumber(ARGV[4]), dispatch = tonumber(ARGV[3]), attempt = tonumber(ARGV[2]),
  owner = ARGV[5], at = now})
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_owner')
compact_record(KEYS[1])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'next_step', ARGV[8])
  redis.call('HDEL', KEYS[1], 'lost', 'failures', 'licence_waits')  -- absent reads as 0
end
if is_one_of(ARGV[12], f[1]) then redis.call('ZADD', KEYS[4], now, ARGV[1]) end
if ARGV[9] ~= '' and is_one_of(ARGV[10], f[1]) then
  redis.call('HSET', KEYS[1], 'state', ARGV[9], 'end', now)
  redis.call('DEL', KEYS[6])
  compact_history(KEYS[3])
  touch(KEYS[7], ARGV[1])
  if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[11]) end
end
return 1
