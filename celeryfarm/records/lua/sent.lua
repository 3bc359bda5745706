-- uses: touch.lua
-- Record a dispatch as sent: the Celery ids in flight and the dispatch number sent. A render
-- node also takes the job out of the outbox and makes its next step await a node (from
-- Redis's clock: the reapers look for the messages of the steps that await one too long,
-- see forget.lua); a client may not write those shared sets, so a node does that for it
-- when it takes the job from the inbox (adopt.lua).
-- KEYS[1] job hash          KEYS[2] the owner's change feed (zset): listings settle active
--                                   jobs by their task ids
-- KEYS[3] outbox (zset)     KEYS[4] awaiting (zset): both given by render nodes only
-- ARGV[1] job id            ARGV[2] the task ids sent (a JSON list)
-- ARGV[3] the dispatch number sent
-- Returns 1, or 0 if the job's record is gone (nothing is recorded for it then).
if KEYS[3] then redis.call('ZREM', KEYS[3], ARGV[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'task_ids', ARGV[2], 'sent', ARGV[3])
if KEYS[4] then redis.call('ZADD', KEYS[4], now, ARGV[1]) end
touch(KEYS[2], ARGV[1])
return 1
