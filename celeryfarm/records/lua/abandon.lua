-- Expire now the lease of a step whose pool process was lost, so the next reaper
-- re-dispatches it, if an execution of that worker still holds it.
-- KEYS[1] job hash          KEYS[2] leases (zset)
-- ARGV[1] job id            ARGV[2] lease owner prefix (task id and node)
-- Returns 1 if the lease was expired, 0 if another execution holds it (or none).
local owner = redis.call('HGET', KEYS[1], 'lease_owner')
if owner and string.sub(owner, 1, #ARGV[2]) == ARGV[2] then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  return 1
end
return 0
