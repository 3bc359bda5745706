-- uses: touch.lua
-- Store a new job's record and history, index it, put it in the change feed and (when
-- dispatching) in the outbox, in one write.
-- KEYS[1] job hash          KEYS[2] change feed (zset) KEYS[3] outbox (zset)
-- KEYS[4] the job's history (string of JSON lines, see add_event in common.lua)
-- KEYS[5..] the indexes the job goes in (zsets: job id -> submission time)
-- ARGV[1] job id            ARGV[2] submission time (ms)
-- ARGV[3] '1': put the job in the outbox; '0': not
-- ARGV[4] the history's first line: the submission, with the commands and environment
-- ARGV[5..] the record's field/value pairs
-- Returns 1.
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[4], ARGV[4])
for i = 5, #KEYS do redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1]) end
if ARGV[3] == '1' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
touch(KEYS[2], ARGV[1])
return 1
