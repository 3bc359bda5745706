-- Take the retries that are due and put them in the outbox, for the caller to send; the
-- outbox's own re-sending covers a caller that dies before it sends them.
-- KEYS[1] retries (zset)    KEYS[2] outbox (zset)
-- ARGV[1] how many at most
-- Returns the job ids to send.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], now, id)
end
return due
