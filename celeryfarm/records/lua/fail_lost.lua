-- uses: touch.lua
-- Fail a job whose step lose.lua found lost once too often, now that the caller has said
-- why in the render log: release the caller's hold on the step, record the loss, and fail
-- the job if it may still fail and is on the same attempt (a cancel and a restart may have
-- come meanwhile).
-- KEYS[1] job hash          KEYS[2] leases (zset)      KEYS[3] the job's events (list)
-- KEYS[4] change feed (zset)
-- ARGV[1] job id            ARGV[2] the hold's owner ('failing:...', from lose.lua)
-- ARGV[3] the attempt lost  ARGV[4] losses in a row    ARGV[5] why the job fails
-- ARGV[6] states a job may fail from (comma-separated) ARGV[7] the state of a failed job
-- Returns 1 if the job failed; 0 if not: the hold was gone (it expired, and another reaper
-- took the step) or the job had moved on.
local f = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'attempt', 'dispatch',
                     'next_step', 'node')
if f[2] ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_owner')
compact_record(KEYS[1])
if f[3] ~= ARGV[3] then return 0 end
add_event(KEYS[3], ARGV[1], {event = 'lost', step = tonumber(f[5]),
  dispatch = tonumber(f[4]), attempt = tonumber(f[3]), owner = string.sub(ARGV[2], #'failing:' + 1),
  node = f[6] or '', lost = tonumber(ARGV[4]), at = now})
if not is_one_of(ARGV[6], f[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[7], 'end', now, 'lost', ARGV[4], 'reason', ARGV[5])
compact_history(KEYS[3])
touch(KEYS[4], ARGV[1])
return 1
