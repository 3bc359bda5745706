-- uses: touch.lua
-- A node that claimed a step of a job that failed on it too often hands the step on, if
-- another live node serves the pool and is not bad for the job: the claim is undone, and
-- the job goes in the retries set, due now, for a reaper to send a new dispatch.
-- KEYS[1] job hash          KEYS[2] leases (zset)      KEYS[3] the job's events (list)
-- KEYS[4] retries (zset)    KEYS[5] the nodes of the job's pool (zset: node -> last seen)
-- KEYS[6] change feed (zset)
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] step              ARGV[5] lease owner        ARGV[6] node
-- ARGV[7] how recently (ms) a node must have been seen to be live
-- ARGV[8] failed tries that make a node bad for the job
-- ARGV[9] states it may leave (comma-separated)        ARGV[10] the state to go to
-- Returns the node it leaves the step to (one of them), or '' if the step runs here: the
-- node is not bad, no other good node is live, or the execution is not current.
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'lease_owner',
                     'bad_nodes')
if f[4] ~= ARGV[5] or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return '' end
if not is_one_of(ARGV[9], f[1]) then return '' end
local bad = cjson.decode(f[5] or '{}')
local threshold = tonumber(ARGV[8])
if (bad[ARGV[6]] or 0) < threshold then return '' end
local other = ''
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], now - tonumber(ARGV[7]), '+inf')) do
  if node ~= ARGV[6] and (bad[node] or 0) < threshold then other = node break end
end
if other == '' then return '' end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_owner')
compact_record(KEYS[1])
add_event(KEYS[3], ARGV[1], {event = 'end', outcome = 'avoided',
  step = tonumber(ARGV[4]), dispatch = tonumber(ARGV[3]), attempt = tonumber(ARGV[2]),
  owner = ARGV[5], at = now})
redis.call('HSET', KEYS[1], 'state', ARGV[10], 'dispatch', tonumber(f[3]) + 1, 'node', '')
redis.call('ZADD', KEYS[4], now, ARGV[1])
touch(KEYS[6], ARGV[1])
return other
