-- uses: lose.lua
-- For a step whose message a worker took from the queue and never started, or whose
-- message vanished (forget.lua): lose the step as reap.lua does, unless its token is no
-- longer current or the step runs after all.
-- KEYS[1] job hash          KEYS[2] the job's events (list)   KEYS[3] outbox (zset)
-- KEYS[4] leases (zset)     KEYS[5] stats (hash)
-- ARGV[1] job id            ARGV[2] attempt            ARGV[3] dispatch
-- ARGV[4] step              ARGV[5] losses in a row that fail the job
-- ARGV[6] states in which a step can be lost (comma-separated)
-- ARGV[7] how long the caller holds a step that fails its job (ms)
-- ARGV[8] the cause, for the log
-- Returns {job id, 'stale'}, {job id, 'leased'} (LossOutcome), or lose's fields.
local f = redis.call('HMGET', KEYS[1], unpack(LOSE_FIELDS))
if not is_one_of(ARGV[6], f[1]) or f[7] ~= ARGV[2] or f[2] ~= ARGV[3] or f[3] ~= ARGV[4] then
  return {ARGV[1], 'stale'}
end
if f[6] then return {ARGV[1], 'leased'} end
return lose(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], f, tonumber(ARGV[5]),
            tonumber(ARGV[7]), ARGV[8], KEYS[5])
