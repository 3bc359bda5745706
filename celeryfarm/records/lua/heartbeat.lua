-- A live node records itself: when it was last seen, its pools and its running steps; and
-- in each pool's set, whether it takes that pool's steps now (it consumes the pool's queue
-- and is not drained), so a claim can tell whether another node is there to take a step it
-- should not run (avoid.lua). Nodes not seen for a day are dropped from the pools' sets.
-- KEYS[1] nodes (zset: node -> last seen)   KEYS[2] the node's hash   KEYS[3] drained (set)
-- KEYS[4], KEYS[5]... the node sets of its pools, in ARGV[2]'s order (zset: node -> seen)
-- ARGV[1] node              ARGV[2] its pools (comma-separated)
-- ARGV[3] its running steps (JSON list of task ids)
-- ARGV[4] the pools whose queues it consumes now (comma-separated)
-- Returns 1 if the node is drained, else 0.
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'pools', ARGV[2], 'running', ARGV[3], 'seen', now)
local drained = redis.call('SISMEMBER', KEYS[3], ARGV[1])
local i = 4
for pool in string.gmatch(ARGV[2], '[^,]+') do
  if drained == 0 and is_one_of(ARGV[4], pool) then
    redis.call('ZADD', KEYS[i], now, ARGV[1])
  else
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - 86400000)
  i = i + 1
end
return drained
