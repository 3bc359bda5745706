-- uses: frames.lua
-- Renew the lease of a running step, and say whether it must stop; the frames it reported
-- done since the last renewal come along.
-- KEYS[1] job hash          KEYS[2] leases (zset)      KEYS[3] the attempt's frames done (set)
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] lease owner       ARGV[5] lease (ms)         ARGV[6] the state of a running job
-- ARGV[7..] frames done since the last renewal
-- Returns 'ok' (renewed), or a FailureKind: 'superseded' (another execution is current)
-- or 'stopped' (the job is no longer running).
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'dispatch', 'lease_owner')
if f[4] ~= ARGV[4] or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return 'superseded' end
if f[1] ~= ARGV[6] then return 'stopped' end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
add_frames(KEYS[1], KEYS[3], 7)
return 'ok'
