-- The change feed, so listings re-read only what changed (celeryfarm.listing): a sorted
-- set of job id -> the number of the latest change a listing shows (a new job, a state, an
-- end, the task ids in flight, a job that left Redis). The member '' holds the last number
-- given, so the feed is one key.
-- changes: the feed (zset)  id: the job id
local function touch(changes, id)
  local seq = redis.call('ZINCRBY', changes, 1, '')
  redis.call('ZADD', changes, seq, id)
end
