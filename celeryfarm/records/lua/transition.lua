-- uses: touch.lua
-- Change a job's state from the client side (cancel, fail, restart), atomically checking
-- its attempt and current state, so a node finishing a step and an artist stopping the job
-- can never both win.
-- KEYS[1] job hash          KEYS[2] the owner's change feed (zset)
-- ARGV[1] job id            ARGV[2] required attempt
-- ARGV[3] states it may leave (comma-separated)     ARGV[4] the state to go to
-- ARGV[5..] field/value pairs to set with it; an empty value deletes the field
-- Returns 1 if applied, 0 if refused, -1 if there is no such job.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local f = redis.call('HMGET', KEYS[1], 'attempt', 'state')
if f[1] ~= ARGV[2] or not is_one_of(ARGV[3], f[2]) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[4])
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
touch(KEYS[2], ARGV[1])
return 1
