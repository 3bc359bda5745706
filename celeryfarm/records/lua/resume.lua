-- A step finished, but its pool process died before Celery sent the chain's next step:
-- dispatch the job's remaining steps again (the caller sends them), if that is still so.
-- Nothing was lost, so no loss is counted.
-- KEYS[1] job hash          KEYS[2] outbox (zset)
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] the step that finished                       ARGV[5] the job's number of steps
-- ARGV[6] states in which the job can be resumed (comma-separated)
-- Returns 1 if re-dispatched; 0 if not: the step had not finished (its lease says what
-- became of it), it was the last one, or the job has moved on (a later step runs or ran,
-- the job ended, was restarted or re-dispatched).
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'next_step',
                     'lease_owner')
if not is_one_of(ARGV[6], f[1]) or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] or f[5] then
  return 0
end
local next_step = tonumber(f[4])
if next_step ~= tonumber(ARGV[4]) + 1 or next_step >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], 'dispatch', tonumber(f[3]) + 1)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
