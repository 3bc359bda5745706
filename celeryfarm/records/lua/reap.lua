-- uses: lose.lua
-- Lose the running step of a job whose lease expired: re-dispatch it, or hold it for the
-- caller to fail the job (fail_lost.lua) after too many losses in a row. Removing the lease and losing the step are one write, so of
-- all the reapers that saw the lease expire exactly one acts on it.
-- KEYS[1] leases (zset)     KEYS[2] job hash           KEYS[3] the job's events (list)
-- KEYS[4] outbox (zset)    KEYS[5] stats (hash)
-- ARGV[1] job id            ARGV[2] losses in a row that fail the job
-- ARGV[3] states in which a step can be lost (comma-separated)
-- ARGV[4] how long the caller holds a step that fails its job (ms)
-- ARGV[5] the cause, for the log
-- Returns {} if there was nothing to do (renewed, or taken by another reaper), else lose's
-- fields: {job id, LossOutcome, step, node, losses in a row, cause[, hold, attempt]}.
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) > now then return {} end
redis.call('ZREM', KEYS[1], ARGV[1])
local f = redis.call('HMGET', KEYS[2], unpack(LOSE_FIELDS))
if not is_one_of(ARGV[3], f[1]) then return {} end
return lose(KEYS[2], KEYS[3], KEYS[4], KEYS[1], ARGV[1], f, tonumber(ARGV[2]),
            tonumber(ARGV[4]), ARGV[5], KEYS[5])
