-- The jobs whose running step's lease has expired, by Redis's clock (read only).
-- KEYS[1] leases (zset)
-- ARGV[1] how many at most
-- Returns job ids; reap.lua then takes each one, if no other reaper did first.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
