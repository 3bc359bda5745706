-- Frames a running step's output reported done, sent along with the writes a step makes
-- anyway (lease renewals and its end) rather than one round trip a frame: each counts once
-- per attempt, and the job's 'frames_done' field keeps the count.
-- job: the job hash    frames: the attempt's frames done (set)
-- first: the index in ARGV of the first frame number (frames run to the end of ARGV)
local function add_frames(job, frames, first)
  if #ARGV < first then return end
  for i = first, #ARGV do redis.call('SADD', frames, ARGV[i]) end
  redis.call('HSET', job, 'frames_done', redis.call('SCARD', frames))
end
