-- uses: touch.lua
-- Record a dispatch as sent: the Celery ids in flight (what a stop revokes), the job out of
-- the outbox, and its next step awaiting a node (from Redis's clock: the reapers look for
-- the messages of the steps that await one too long, see forget.lua).
-- KEYS[1] job hash          KEYS[2] outbox (zset)      KEYS[3] awaiting (zset)
-- KEYS[4] change feed (zset): listings settle active jobs by their task ids
-- ARGV[1] job id            ARGV[2] the task ids sent (a JSON list)
-- Returns 1, or 0 if the job's record is gone (nothing is recorded for it then).
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'task_ids', ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[1])
touch(KEYS[4], ARGV[1])
return 1
