-- Claim the outbox entries older than an age: dispatches recorded whose sender must have
-- died before sending them. Each is re-stamped, so another reaper leaves it alone.
-- KEYS[1] outbox (zset)
-- ARGV[1] age (ms)          ARGV[2] how many at most
-- Returns the job ids to send again.
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                         'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(stale) do redis.call('ZADD', KEYS[1], now, id) end
return stale
