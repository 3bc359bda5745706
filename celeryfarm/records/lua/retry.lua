-- uses: observe.lua, frames.lua, touch.lua
-- A try of a step failed and the step runs again later: record it, if the execution is
-- still the current one, release its lease, count the try, and put the job in the
-- retries set for a reaper to send a new dispatch of the same step when it is due.
-- KEYS[1] job hash          KEYS[2] leases (zset)      KEYS[3] the job's events (list)
-- KEYS[4] retries (zset)    KEYS[5] stats (hash: the try counts there too, as
--                                    'retries_failures' or 'retries_licence_waits')
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] step              ARGV[5] lease owner        ARGV[6] delay (ms)
-- ARGV[7] the counter the try adds to: 'failures' (a retry used) or 'licence_waits'
-- ARGV[8] states a retry may leave (comma-separated)   ARGV[9] the state to go to
-- ARGV[10] why the try failed, for the events
-- KEYS[6] the attempt's frames done (set)       KEYS[7] change feed (zset)
-- ARGV[11] how long the render ran (s)  ARGV[12] the histogram's bucket bounds (comma-separated)
-- ARGV[13..] frames the step reported done since its last lease renewal
-- A try that uses a retry also counts against the node it ran on, in the job's
-- 'bad_nodes' field (JSON: node -> failed tries), which claims read (see avoid.lua).
-- Returns the counter's new value; 0 if the execution was no longer current or the job
-- may not run again (it was stopped meanwhile): nothing is changed but the lease.
observe(KEYS[5], ARGV[11], ARGV[12])
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'lease_owner', 'node',
                     'bad_nodes')
if f[4] ~= ARGV[5] or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return 0 end
add_frames(KEYS[1], KEYS[6], 13)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_owner')
compact_record(KEYS[1])
add_event(KEYS[3], ARGV[1], {event = 'end', outcome = 'failed',
  retry = ARGV[7], why = ARGV[10], step = tonumber(ARGV[4]), dispatch = tonumber(ARGV[3]),
  attempt = tonumber(ARGV[2]), owner = ARGV[5], at = now})
if not is_one_of(ARGV[8], f[1]) then return 0 end
local count = redis.call('HINCRBY', KEYS[1], ARGV[7], 1)
redis.call('HINCRBY', KEYS[5], 'retries_' .. ARGV[7], 1)
if ARGV[7] == 'failures' and f[5] and f[5] ~= '' then
  local bad = cjson.decode(f[6] or '{}')
  bad[f[5]] = (bad[f[5]] or 0) + 1
  redis.call('HSET', KEYS[1], 'bad_nodes', cjson.encode(bad))
end
redis.call('HSET', KEYS[1], 'state', ARGV[9], 'dispatch', tonumber(f[3]) + 1, 'node', '')
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[1])
touch(KEYS[7], ARGV[1])
return count
