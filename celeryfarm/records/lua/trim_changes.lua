-- Keep the change feed to its newest entries: a listing whose last call is older than the
-- oldest one kept reads its jobs afresh (it sees 'changes_floor' above its position).
-- KEYS[1] change feed (zset)                   KEYS[2] stats (hash: 'changes_floor')
-- ARGV[1] how many jobs' latest changes to keep
-- Returns how many entries left the feed.
local extra = redis.call('ZCARD', KEYS[1]) - 1 - tonumber(ARGV[1])  -- '' is not a job
if extra <= 0 then return 0 end
local last = redis.call('ZRANGE', KEYS[1], extra - 1, extra - 1, 'WITHSCORES')
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
local floor = tonumber(redis.call('HGET', KEYS[2], 'changes_floor') or '0')
if tonumber(last[2]) > floor then redis.call('HSET', KEYS[2], 'changes_floor', last[2]) end
return extra
