-- A running step's output says a frame of the job is done: count it once per attempt, if
-- the execution is still the current one.
-- KEYS[1] job hash          KEYS[2] the attempt's frames done (set)
-- ARGV[1] attempt           ARGV[2] lease owner        ARGV[3] frame number
-- Returns the frames done so far, or 0 if the execution is no longer current.
local f = redis.call('HMGET', KEYS[1], 'attempt', 'lease_owner')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then return 0 end
redis.call('SADD', KEYS[2], ARGV[3])
local done = redis.call('SCARD', KEYS[2])
redis.call('HSET', KEYS[1], 'frames_done', done)
return done
