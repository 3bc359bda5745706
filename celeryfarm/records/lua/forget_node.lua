-- A wrangler forgets a render node that is gone (retired, or a container made again under
-- a new name): it leaves the nodes' list, its record, the drained set and its pools' node
-- sets; unless it was seen within ARGV[2] ms, when nothing changes (it is not gone). One
-- write with the check, so a heartbeat in between is never undone.
-- KEYS[1] nodes (zset: node -> last seen)   KEYS[2] the node's hash   KEYS[3] drained (set)
-- KEYS[4], KEYS[5]... the node sets of its pools (zset: node -> seen)
-- ARGV[1] node              ARGV[2] how recently (ms) a node must have been seen to stay
-- Returns {ms since it was last seen (-1: no such node), 1 if it was forgotten else 0}.
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seen then return {-1, 0} end
local silent = now - tonumber(seen)
if silent <= tonumber(ARGV[2]) then return {silent, 0} end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
for i = 4, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
return {silent, 1}
