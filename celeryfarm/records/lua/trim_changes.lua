-- Keep an owner's change feed to its newest entries: a listing whose last call is older
-- than the oldest one kept reads its jobs afresh (it sees the feed's floor above its
-- position).
-- KEYS[1] the owner's change feed (zset)       KEYS[2] stats (hash)
-- ARGV[1] how many jobs' latest changes to keep
-- ARGV[2] the field of KEYS[2] that holds the feed's floor ('changes_floor:<owner>')
-- Returns how many entries left the feed.
local extra = redis.call('ZCARD', KEYS[1]) - 1 - tonumber(ARGV[1])  -- '' is not a job
if extra <= 0 then return 0 end
local last = redis.call('ZRANGE', KEYS[1], extra - 1, extra - 1, 'WITHSCORES')
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
local floor = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if tonumber(last[2]) > floor then redis.call('HSET', KEYS[2], ARGV[2], last[2]) end
return extra
