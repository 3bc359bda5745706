-- A step's duration into the farm's histogram (celeryfarm metrics), in the write that ends
-- the step: the one bucket 'step_in_<bound>' it falls in (the smallest bound it does not
-- exceed; none past the last), 'step_count' and 'step_sum'. The reader adds the buckets up
-- into Prometheus's cumulative ones: one increment a step rather than one per bucket.
-- Used by the scripts that end a step (finish.lua, retry.lua).
-- stats: the stats hash      seconds: the duration as text ('' adds nothing)
-- bounds: the buckets' upper bounds, comma-separated and ascending, as the field names
--         spell them
local function observe(stats, seconds, bounds)
  if seconds == '' then return end
  local value = tonumber(seconds)
  for bound in string.gmatch(bounds, '[^,]+') do
    if value <= tonumber(bound) then
      redis.call('HINCRBY', stats, 'step_in_' .. bound, 1)
      break
    end
  end
  redis.call('HINCRBY', stats, 'step_count', 1)
  redis.call('HINCRBYFLOAT', stats, 'step_sum', seconds)
end
