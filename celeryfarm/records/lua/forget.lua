-- Of the jobs said to await a node (expired.lua on the awaiting set), forget those whose
-- step no longer does (a node claimed it, or the job ended) and say which step each of the
-- others awaits, so the reaper can look for its message. Reading a job and forgetting it
-- are one write, so a step that began to await meanwhile is never forgotten.
-- KEYS[1] awaiting (zset)   KEYS[2..] the job hashes of ARGV[2..]
-- ARGV[1] states in which a step can await a node (comma-separated)
-- ARGV[2..] job ids
-- Returns {job id, attempt, dispatch, step, queue} of each step that still awaits a node.
local out = {}
for i = 2, #ARGV do
  local f = redis.call('HMGET', KEYS[i], 'state', 'attempt', 'dispatch', 'next_step',
                       'lease_owner', 'queue')
  if is_one_of(ARGV[1], f[1]) and not f[5] then
    table.insert(out, {ARGV[i], f[2], f[3], f[4], f[6] or ''})
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return out
