-- Give memory back after removals: Redis before 7.4 never shrinks a sorted set's hash
-- table, so an index that once held 100,000 jobs keeps a table for 100,000 after retention
-- took 90% of them. Copying the set makes one sized for what it holds. Done when its size
-- reaches a power of two on its way down, so each entry is copied O(1) times on average;
-- sets too small to have a table (listpacks, 128 entries by default) are never copied, nor
-- sets over 16,384 entries: a copy blocks Redis (25 ms for 16,384 on a slow machine, 90 ms
-- for 65,536), and what such a table wastes is a few bytes a job it once held.
-- set: the sorted set an entry just left     scratch: a key no one else uses (Keys.scratch)
local function shrink(set, scratch)
  local size = redis.call('ZCARD', set)
  if size >= 128 and size <= 16384 and bit.band(size, size - 1) == 0 then
    redis.call('ZRANGESTORE', scratch, set, 0, -1)
    redis.call('RENAME', scratch, set)
  end
end
