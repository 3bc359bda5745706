-- uses: touch.lua, shrink.lua
-- A job that finished longer ago than the farm keeps history leaves Redis with all its
-- keys (render logs and frames stay on the shared mount), unless it was restarted or is
-- running again meanwhile. Its owner's change feed gets it, so listings drop it on their
-- next call.
-- KEYS[1] job hash          KEYS[2] the owner's change feed (zset)
-- KEYS[3] missing (hash)    KEYS[4] inbox (list: a client's entry a node never took)
-- KEYS[5] scratch (a sorted set's copy while it shrinks, see shrink.lua)
-- KEYS[6] .. KEYS[5 + ARGV[4]] sorted sets to take the job out of (its indexes, leases,
--         awaiting, outbox, retries)
-- KEYS[6 + ARGV[4]] .. keys to delete with it (its events, each attempt's frames done,
--         Celery's results of its steps)
-- ARGV[1] job id            ARGV[2] how long (ms) finished jobs are kept
-- ARGV[3] finished states (comma-separated)             ARGV[4] how many sorted sets
-- Returns 1 if the job left, 0 if it stays.
local f = redis.call('HMGET', KEYS[1], 'state', 'end')
if not is_one_of(ARGV[3], f[1]) or not f[2] or tonumber(f[2]) > now - tonumber(ARGV[2]) then
  return 0
end
local sets = tonumber(ARGV[4])
for i = 6, 5 + sets do
  if redis.call('ZREM', KEYS[i], ARGV[1]) == 1 then shrink(KEYS[i], KEYS[5]) end
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LREM', KEYS[4], 0, ARGV[1])
redis.call('DEL', KEYS[1], unpack(KEYS, 6 + sets))
touch(KEYS[2], ARGV[1])
return 1
