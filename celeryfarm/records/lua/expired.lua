-- The members of a sorted set of times (ms) that are at least an age old, by Redis's clock
-- (read only): the jobs whose running step's lease has expired (leases hold deadlines, age
-- 0), or whose step has awaited a node for that long (see forget.lua).
-- KEYS[1] leases or awaiting (zset)
-- ARGV[1] how many at most (-1: all)                   ARGV[2] age (ms)
-- Returns job ids; reap.lua (or forget.lua) then takes each one, if no other reaper did
-- first.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]),
                  'LIMIT', 0, tonumber(ARGV[1]))
