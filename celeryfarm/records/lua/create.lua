-- uses: touch.lua
-- Store a new job's record and history, index it and put it in its owner's change feed, in
-- one write. A client (an artist's credential) gives only the keys it may write: the
-- job's, its owner's index and feed; the shared indexes, outbox and awaiting set are a
-- render node's (adopt.lua takes the job from the inbox, which the client pushes to in the
-- same transaction).
-- KEYS[1] job hash          KEYS[2] the owner's change feed (zset)
-- KEYS[3] the job's history (string of JSON lines, see add_event in common.lua)
-- KEYS[4..] the indexes the job goes in (zsets: job id -> submission time)
-- ARGV[1] job id            ARGV[2] submission time (ms)
-- ARGV[3] the history's first line: the submission, with the commands and environment
-- ARGV[4..] the record's field/value pairs
-- Returns 1.
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[3], ARGV[3])
for i = 4, #KEYS do redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1]) end
touch(KEYS[2], ARGV[1])
return 1
