-- Take a job from the inbox, where a client recorded a dispatch of it (a submission or a
-- restart), into the shared structures that only render nodes write: the index of all jobs
-- and its session's index; then, once its client has sent the dispatch, the awaiting set
-- (its step awaits a node); if the client has not sent it within the outbox's age (it
-- died), the outbox, from which a reaper sends it.
-- KEYS[1] inbox (list)      KEYS[2] job hash           KEYS[3] all jobs' index (zset)
-- KEYS[4] the job's session's index (zset)             KEYS[5] outbox (zset)
-- KEYS[6] awaiting (zset)
-- ARGV[1] job id            ARGV[2] the outbox's age (ms)
-- Returns 'gone', 'sent', 'stale', or 'unsent' (left in the inbox for a later pass).
local f = redis.call('HMGET', KEYS[2], 'submitted', 'dispatch', 'sent')
if not f[1] then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return 'gone'
end
redis.call('ZADD', KEYS[3], f[1], ARGV[1])
redis.call('ZADD', KEYS[4], f[1], ARGV[1])
if f[3] == f[2] then
  redis.call('ZADD', KEYS[6], 'NX', now, ARGV[1])
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return 'sent'
end
if tonumber(f[1]) <= now - tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[5], 'NX', f[1], ARGV[1])
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return 'stale'
end
return 'unsent'
